"""What the training workers do about a group that changes size or loses nodes: checkpoints by time, checkpoints on a
preemption notice, and the record of every restart of the group (a resize or a retry after a failure).

With ``workers.num_workers: [min, max]`` Ray Train restarts the worker group at a new size from the latest checkpoint
whenever nodes go or come (:mod:`edsr_ray.training.run`); every group runs
:func:`~edsr_ray.training.loop.train_loop_per_worker` from the top. Three things bound and show what that costs:

* :class:`CheckpointClock` - rank 0's clock decides when ``run.checkpoint_every_s`` has passed since the last
  checkpoint; the decision rides on the loss check every worker already takes part in (no collective of its own), so
  a resize or preemption loses at most about that much work.
* :func:`preemption_notice` - Ray Train 2.60 tells the workers when a node of the group is being drained for
  preemption (``ray.train.get_preemption_info``); the loop then checkpoints at once, before the node goes.
* :func:`record_group_start` - at each group start rank 0 compares its group size with the last one logged to
  MLflow, and logs one line, the ``workers`` and ``resizes`` metrics, a ``resizes/<update>-<unix ms>.json``
  artifact and the ``last_resize`` tag: when, from, to, why, the update it resumed from and the updates redone.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger(__name__)

WORKERS_METRIC = "workers"
RESIZES_METRIC = "resizes"


class CheckpointClock:
    """Whether ``every_s`` seconds passed since the last checkpoint (None: never due). Read on rank 0 only."""

    def __init__(self, every_s: float | None) -> None:
        self.every_s = every_s
        self.last = time.monotonic()

    def due(self) -> bool:
        return self.every_s is not None and time.monotonic() - self.last >= self.every_s

    def reset(self) -> None:
        self.last = time.monotonic()


def preemption_notice() -> dict[str, Any] | None:
    """The preemption Ray announced for a node of this group, or None (a collective: every rank calls it in step).

    Returned as plain data for the checkpoint's metadata: ``deadline`` (UNIX seconds, None when the drain has no
    deadline), ``nodes``, ``ranks`` and ``seen`` (when this worker learned of it).
    """
    import ray.train

    info = ray.train.get_preemption_info()
    if info is None:
        return None
    ranks = sorted({r for rs in info.preempted_node_to_ranks.values() for r in rs})
    deadline = info.deadline_ms / 1000 if info.deadline_ms else None
    return {"deadline": deadline, "nodes": sorted(info.preempted_node_to_ranks), "ranks": ranks, "seen": time.time()}


@dataclass(frozen=True)
class GroupRestart:
    """One restart of the worker group, as rank 0 of the new group sees it."""

    when: float  # UNIX seconds
    from_workers: int
    to_workers: int
    why: str
    resumed_from: int  # the update of the checkpoint the group started from
    redone: int  # updates the previous group had logged beyond that checkpoint (lost and run again)
    seconds_without_training: float | None  # since the previous group last logged an update

    def line(self) -> str:
        idle = self.seconds_without_training
        idle = "" if idle is None else f", {idle:.0f} s without training"
        return (
            f"workers {self.from_workers} -> {self.to_workers} at update {self.resumed_from} ({self.why}); resumed "
            f"from the checkpoint of update {self.resumed_from}, {self.redone} updates redone{idle}"
        )


def _why(previous: int, current: int, notice: dict[str, Any] | None, new_job: bool) -> str:
    if new_job:
        return "run resumed by a new job"
    if current > previous:
        return "nodes added"
    what = "nodes lost" if current < previous else "workers restarted"
    if notice is not None:
        lead = notice.get("deadline")
        lead = "" if lead is None else f", seen {max(0.0, lead - notice['seen']):.0f} s before its deadline"
        return f"{what}: preempted{lead}"
    return f"{what}: without notice" if current < previous else f"{what} after a failure"


def record_group_start(
    tracker: Any, world: int, step: int, meta: dict[str, Any] | None, job_start: float | None = None
) -> GroupRestart | None:
    """Log this group's size and, when an earlier group of the run logged one, the restart (rank 0 only).

    ``tracker``: the run's :class:`~edsr_ray.tracking.RunLogger`; ``step``: the update resumed from; ``meta``: the
    resumed checkpoint's metadata (its ``notice`` says whether the previous group was preempted), None on a start
    from scratch; ``job_start``: when the driver started (UNIX seconds), so that a group of an earlier job of the same
    run is told apart from one of this job. Returns the restart, or None for the run's first group.
    """
    previous = tracker.last_metric(WORKERS_METRIC)
    restart = None
    if previous is not None:
        last_loss = tracker.last_metric("loss")
        now = time.time()
        restart = GroupRestart(
            when=now,
            from_workers=int(previous.value),
            to_workers=world,
            why=_why(
                int(previous.value),
                world,
                (meta or {}).get("notice"),
                new_job=job_start is not None and previous.timestamp / 1000 < job_start,
            ),
            resumed_from=step,
            redone=max(0, int(last_loss.step) - step) if last_loss is not None else 0,
            seconds_without_training=now - last_loss.timestamp / 1000 if last_loss is not None else None,
        )
        count = tracker.last_metric(RESIZES_METRIC)
        total = (int(count.value) if count is not None else 0) + int(world != restart.from_workers)
        log.info("%s", restart.line())
        tracker.log_metrics({RESIZES_METRIC: total}, step)
        tracker.log_text(json.dumps(asdict(restart), indent=2), f"resizes/{step:08d}-{int(now * 1000)}.json")
        tracker.set_tag("last_resize", restart.line())
    tracker.log_metrics({WORKERS_METRIC: world}, step)
    return restart
