"""Ray Train across nodes, on the two ``ray start`` nodes of a local cluster, fed by the Ray Data patch stream from the
embedded S3 server, tracked in a private sqlite MLflow store: two gloo workers on different nodes; and an elastic
group (``workers.num_workers: [1, 2]``) that trains at 2, shrinks to 1 when node B is stopped (announced as a
preemption, as a Kubernetes pod deletion does), grows to 2 when it comes back, and computes what a fixed-size run
computes: the same number of updates, each of exactly ``train.batch_size`` patches at the learning rate of the same
schedule."""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from edsr_ray import storage, tracking
from edsr_ray.config import ExperimentConfig, from_dict
from edsr_ray.infra.localcluster import LocalCluster, NodeSpec
from edsr_ray.training.run import run_training

ROOT = "s3://edsr/multinode-tests/div2k"
RUNS = "s3://edsr/multinode-tests/runs"
DRAIN_S = 5  # node B announces its stop this far ahead

pytestmark = pytest.mark.slow

# Ray Train's pace for resizes (read by the driver before fit(), passed on to the controller and workers): a start
# attempt at a size the cluster no longer has gives up after 10 s (default 60), failures and preemption notices are
# seen within a second.
RAY_TRAIN_ENV = {
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1",
    "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1",
}


@pytest.fixture(scope="module")
def cluster(s3, sample_div2k, tmp_path_factory):
    """Head: 3 CPUs, node B: 2 CPUs (a train worker + Ray Data read tasks), this process connected as the driver, the
    sample set ingested at x2. Node B drains for DRAIN_S seconds when stopped."""
    import ray

    from edsr_ray.ingest import ingest

    home = tmp_path_factory.mktemp("home")
    job_env = {**s3.env(), "EDSR_RAY_HOME": str(home), "MLFLOW_DISABLE_TELEMETRY": "true", **RAY_TRAIN_ENV}
    nodes = [NodeSpec(num_cpus=3), NodeSpec(num_cpus=2, env={"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": str(DRAIN_S)})]
    with LocalCluster(nodes) as local, pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDSR_RAY_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        for key, value in RAY_TRAIN_ENV.items():
            mp.setenv(key, value)
        # Environment for every worker the driver starts, as a job would pass it (--runtime-env-json).
        local.connect(runtime_env={"env_vars": job_env}, log_to_driver=False)
        try:
            report = ingest([str(sample_div2k)], ROOT, scales=(2,), progress=False)
            assert report.failed == []
            yield local
        finally:
            ray.shutdown()


def _config(name: str, *, data=None, train=None, workers=None, run=None) -> ExperimentConfig:
    return from_dict(
        ExperimentConfig,
        {
            "model": {"arch": "edsr", "n_resblocks": 1, "n_feats": 8, "scales": [2]},
            "data": {
                "root": ROOT,
                "val_range": [801, 900],
                "patch_size": 16,
                "patches_per_image": 16,
                "epoch_patches": 96,
                "val_max_size": 96,
                **(data or {}),
            },
            "train": {"batch_size": 4, "lr": 1e-3, "total_steps": 8, "val_every": 4, "log_every": 2, **(train or {})},
            "workers": {"num_workers": 2, "cpus_per_worker": 1, **(workers or {})},
            "run": {"name": name, "storage_path": RUNS, "max_failures": 0, **(run or {})},
            "tracking": {"experiment": "multinode-tests", "log_images": False},
        },
    )


def _train_worker_nodes(cluster: LocalCluster) -> dict[str, str]:
    """actor id -> node id of every Ray Train worker this cluster has run (the state API keeps dead actors)."""
    from ray.util.state import list_actors

    actors = list_actors(
        address=cluster.dashboard_url,  # never auto-detected: other Ray instances may run on this machine
        filters=[("class_name", "=", "RayTrainWorker")],
        detail=True,
        raise_on_missing_output=False,
    )
    return {a.actor_id: a.node_id for a in actors}


def test_two_gloo_workers_on_different_nodes_train_from_s3(cluster):
    cfg = _config("spread", workers={"placement_strategy": "STRICT_SPREAD"})
    outcome = run_training(cfg)

    # One worker on each node of the cluster.
    node_ids = {n["node_id"] for n in cluster.nodes() if n["state"] == "ALIVE"}
    assert len(node_ids) == 2
    workers = _train_worker_nodes(cluster)
    assert len(workers) == 2, workers
    assert set(workers.values()) == node_ids

    # The run went the whole way: every update happened (the gradients of both ranks were all-reduced across the
    # nodes in each of them), was logged, validated and checkpointed.
    assert outcome.steps == 8
    client = tracking.mlflow_module().MlflowClient(tracking_uri=tracking.resolve_tracking_uri())
    assert client.get_run(outcome.mlflow_run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(outcome.mlflow_run_id, "loss")] == [2, 4, 6, 8]
    assert [m.step for m in client.get_metric_history(outcome.mlflow_run_id, "val_psnr_x2")] == [4, 8]
    state = torch.load(
        io.BytesIO(storage.read_bytes(f"s3://{outcome.checkpoint_path}/train_state.pt")), weights_only=True
    )
    assert state["step"] == 8 and state["scheduler"]["last_epoch"] == 8


# The elastic run must outlast the resizes (a good part of it runs at 1 worker while node B restarts and Ray grows the
# group), however fast this machine trains: its length is the larger of TOTAL_STEPS and RESIZE_BUDGET_S of training at
# the pace the fixed run measured first. Epochs of 2 updates (each a new pass of the Ray Data stream) also bound it.
TOTAL_STEPS = 300
FIXED_STEPS = TOTAL_STEPS // 2
RESIZE_BUDGET_S = 240.0
LOG_EVERY = 10
LR_STEP = 60


def _elastic_config(name: str, num_workers, total_steps: int = TOTAL_STEPS) -> ExperimentConfig:
    """2 CPUs per worker: Ray counts one worker per node, 2 with both nodes, 1 without B."""
    return _config(
        name,
        data={"epoch_patches": 12},
        train={
            "batch_size": 5,  # 3 + 2 at two workers, 5 at one
            "lr_step": LR_STEP,
            "total_steps": total_steps,
            "val_every": total_steps,
            "log_every": LOG_EVERY,
        },
        workers={"num_workers": num_workers, "cpus_per_worker": 2, "resize_check_s": 5},
        # No failure allowed (max_failures 0): a stop announced as a preemption must not count as one.
        run={"checkpoint_every_s": 3, "num_to_keep": 2},
    )


def _checkpoint_metas(name: str) -> list[dict]:
    metas = []
    for uri in storage.list_files(f"{RUNS}/{name}"):
        if uri.endswith("/meta.json"):
            with contextlib.suppress(storage.NotFoundError, ValueError):  # pruned or being written meanwhile
                metas.append(json.loads(storage.read_bytes(uri)))
    return metas


def _wait_for(what: str, predicate, run: threading.Thread, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if not run.is_alive():
            pytest.fail(f"the run ended before {what}: raise RESIZE_BUDGET_S so that it outlasts the resizes")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout_s:.0f} s")
        time.sleep(0.5)


def _history(run_id: str, key: str) -> list:
    client = tracking.mlflow_module().MlflowClient(tracking_uri=tracking.resolve_tracking_uri())
    return sorted(client.get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))


def _last_per_step(run_id: str, key: str) -> dict[int, float]:
    """step -> value, the value logged last for each step (updates redone after a restart log their step again)."""
    return {m.step: m.value for m in _history(run_id, key)}


def test_elastic_run_shrinks_and_grows_and_computes_what_a_fixed_run_computes(cluster):
    # The same recipe at a fixed size first (1 worker, the faster here: the recipe does not depend on it), for the
    # first FIXED_STEPS updates; its pace sets how long the elastic run must be to outlast the resizes.
    fixed = run_training(_elastic_config("fixed", 1, total_steps=FIXED_STEPS))
    assert fixed.steps == FIXED_STEPS
    logged = _history(fixed.mlflow_run_id, "loss")
    seconds_per_update = (logged[-1].timestamp - logged[0].timestamp) / 1000 / (logged[-1].step - logged[0].step)
    needed = RESIZE_BUDGET_S / max(seconds_per_update, 1e-3)
    total_steps = max(TOTAL_STEPS, LOG_EVERY * int(np.ceil(needed / LOG_EVERY)))
    print(f"\nfixed run: {seconds_per_update * 1000:.0f} ms per update; the elastic run takes {total_steps} updates")
    results: dict = {}

    def train(name, workers):
        try:
            results[name] = run_training(_elastic_config(name, workers, total_steps=total_steps))
        except BaseException as exc:  # reported by the assertions below
            results[name] = exc

    run = threading.Thread(target=train, args=("elastic", [1, 2]))
    run.start()
    try:
        at_two = lambda: any(m["workers"] == 2 for m in _checkpoint_metas("elastic"))  # noqa: E731
        _wait_for("a checkpoint at 2 workers", at_two, run)
        stopped = time.monotonic()
        cluster.stop_node(1)  # drains for DRAIN_S (a preemption notice), then goes
        _wait_for("a checkpoint at 1 worker", lambda: any(m["workers"] == 1 for m in _checkpoint_metas("elastic")), run)
        shrink_s = time.monotonic() - stopped
        back, back_wall = time.monotonic(), time.time()
        cluster.start_node(1)
        _wait_for(
            "a checkpoint at 2 workers after node B came back",
            lambda: any(m["workers"] == 2 and m["time"] > back_wall for m in _checkpoint_metas("elastic")),
            run,
        )
        grow_s = time.monotonic() - back
    finally:
        run.join(timeout=600)
    elastic = results["elastic"]
    assert not isinstance(elastic, BaseException), elastic
    print(f"\nelastic: training at 1 worker {shrink_s:.0f} s after node B was stopped, at 2 again {grow_s:.0f} s after")

    # Exactly total_steps updates, and the schedule where a fixed run has it.
    assert elastic.steps == total_steps
    state = torch.load(
        io.BytesIO(storage.read_bytes(f"s3://{elastic.checkpoint_path}/train_state.pt")), weights_only=True
    )
    assert state["step"] == total_steps and state["scheduler"]["last_epoch"] == total_steps
    run_id = elastic.mlflow_run_id

    # The group went 2 -> 1 -> 2, each resize recorded once with its cause, nothing counted as a failure (max_failures
    # is 0: a counted failure would have ended the run).
    sizes = [int(m.value) for m in _history(run_id, "workers")]
    changes = [s for i, s in enumerate(sizes) if i == 0 or s != sizes[i - 1]]
    assert changes == [2, 1, 2], sizes
    client = tracking.mlflow_module().MlflowClient(tracking_uri=tracking.resolve_tracking_uri())
    records = [
        json.loads(Path(client.download_artifacts(run_id, a.path)).read_text())
        for a in client.list_artifacts(run_id, "resizes")
    ]
    resizes = [(r["from_workers"], r["to_workers"], r["why"]) for r in records if r["from_workers"] != r["to_workers"]]
    assert [(f, t) for f, t, _ in resizes] == [(2, 1), (1, 2)], records
    assert resizes[0][2].startswith("nodes lost: preempted") and resizes[1][2] == "nodes added", resizes
    assert max(m.value for m in _history(run_id, "resizes")) == 2

    # Every update of every logged window used exactly batch_size patches (the workers' own counts, summed), at both
    # sizes; the learning rate at every logged update is the fixed schedule's.
    for key in ("patches_per_update_min", "patches_per_update_max"):
        assert {m.value for m in _history(run_id, key)} == {5.0}, key
    lrs = _last_per_step(run_id, "lr")
    assert sorted(lrs) == list(range(LOG_EVERY, total_steps + 1, LOG_EVERY))
    for step, value in lrs.items():
        assert value == pytest.approx(1e-3 * 0.5 ** (step // LR_STEP), rel=1e-6, abs=0), step

    # Against the fixed run, over its FIXED_STEPS updates: the same learning rates, and a loss curve that differs only
    # by the data order (patches are drawn afresh, and the resized run redid some updates on other patches).
    half = FIXED_STEPS
    fixed_lrs = _last_per_step(fixed.mlflow_run_id, "lr")
    assert fixed_lrs == {s: v for s, v in lrs.items() if s <= half}
    a, b = _last_per_step(run_id, "loss"), _last_per_step(fixed.mlflow_run_id, "loss")
    start = [s for s in sorted(b) if s <= 30]
    late = [s for s in sorted(b) if s > half // 2]
    first_a, first_b = np.mean([a[s] for s in start]), np.mean([b[s] for s in start])
    late_a, late_b = np.mean([a[s] for s in late]), np.mean([b[s] for s in late])
    print(
        f"mean loss, updates 1-30: elastic {first_a:.3f}, fixed {first_b:.3f}; updates {half // 2 + 1}-{half}: "
        f"elastic {late_a:.3f}, fixed {late_b:.3f}"
    )
    assert late_a < 0.8 * first_a and late_b < 0.8 * first_b  # both learned
    assert abs(late_a - late_b) < 0.2 * late_b  # the same curve within the noise of the data order
