"""The training driver: checks that fail fast, the ``TorchTrainer``, and the models it registers.

:func:`run_training` checks the data, the tracking server and the initial weights before any cluster work
(:func:`preflight`), builds the Ray Data patch stream (:mod:`edsr_ray.training.patches`) and the ``TorchTrainer`` that
runs :func:`~edsr_ray.training.loop.train_loop_per_worker` on every worker, shows the workers' progress here
(:class:`~edsr_ray.infra.ray.LogRelay`), and registers the final and best models in MLflow; :func:`train` is what
``jobs/train.py`` calls. Re-running the same ``run.name`` and ``run.storage_path`` resumes from the latest checkpoint
(:mod:`edsr_ray.training.checkpoints`); a worker that dies restarts the group from it (``run.max_failures``; a node
drained for preemption counts against ``run.max_preemptions`` instead). With ``workers.num_workers: [min, max]`` the
group is elastic: Ray Train starts it once ``min`` workers fit, restarts it larger when nodes arrive (looking every
``workers.resize_check_s``) and smaller when nodes go, each time from the latest checkpoint
(:mod:`edsr_ray.training.elastic`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edsr_ray import manifest, tracking
from edsr_ray.config import ExperimentConfig, flatten, to_dict
from edsr_ray.errors import EdsrRayError, Interrupted
from edsr_ray.mlflow_model import log_model
from edsr_ray.training.checkpoints import TRAIN_STATE
from edsr_ray.training.loop import train_loop_per_worker

log = logging.getLogger(__name__)


class NonFiniteLossError(EdsrRayError):
    """The loss became NaN or Inf; training stopped and the last good checkpoint was kept."""


@dataclass
class TrainOutcome:
    """What a finished training run produced."""

    steps: int
    metrics: dict[str, float]
    checkpoint_path: str | None
    best_checkpoint_path: str | None
    mlflow_run_id: str | None
    registered: dict[str, str] = field(default_factory=dict)  # alias -> "name/version"


def _storage_for_run(cfg: ExperimentConfig) -> tuple[str, Any]:
    """Ray Train storage path + filesystem: a local folder (absolute) or an S3 prefix through our settings."""
    from edsr_ray import storage

    path = cfg.run.location
    if storage.is_s3(path):
        fs, fs_path = storage.resolve_pyarrow(path, cfg.storage)
        return fs_path, fs
    local = storage.local_path(path).resolve()  # a plain path or a file:// URI (config validation refused others)
    local.mkdir(parents=True, exist_ok=True)
    return str(local), None


def _has_checkpoints(cfg: ExperimentConfig) -> bool:
    """Whether the run already wrote a checkpoint (Ray Train will then resume it)."""
    from edsr_ray import storage

    base = cfg.run.location
    run_dir = storage.join(base, cfg.run.name) if storage.is_s3(base) else str(storage.local_path(base) / cfg.run.name)
    try:
        return any(uri.endswith("/" + TRAIN_STATE) for uri in storage.list_files(run_dir, cfg.storage))
    except storage.NotFoundError:
        return False


def preflight(cfg: ExperimentConfig) -> str:
    """Checks that fail within seconds and before any cluster work: data, tracking, initial weights."""
    uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    tracking.check_tracking_uri(uri)
    manifest.check_dataset(cfg.data, cfg.model.scales, storage=cfg.storage)
    if cfg.train.init_from:
        from edsr_ray.models import build_model
        from edsr_ray.weights import init_from

        init_from(build_model(cfg.model), cfg.train.init_from)  # wrong architecture: clear error now
    return uri


def run_training(cfg: ExperimentConfig, *, source: str = "config") -> TrainOutcome:
    """Build and fit the ``TorchTrainer``; register the final and best models in MLflow."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from edsr_ray.infra.ray import relayed_logs
    from edsr_ray.training.patches import patch_dataset  # Ray Data: imported when a run starts

    uri = preflight(cfg)
    storage_path, storage_fs = _storage_for_run(cfg)
    run_key = f"{cfg.run.location.rstrip('/')}/{cfg.run.name}"
    resume = _has_checkpoints(cfg)
    run_id = tracking.find_or_create_run(cfg.tracking, run_key, cfg.run.name, uri, resume=resume)
    if resume:
        log.info("run %s has checkpoints in %s: resuming from the latest", cfg.run.name, cfg.run.location)
    logger = tracking.RunLogger(run_id, uri)
    logger.log_params({**flatten(cfg), "config_source": source})
    logger.log_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True), "config.json")

    train_ds = patch_dataset(cfg.data, cfg.model.scales, storage=cfg.storage, split="train")
    # One progress line per log_every updates comes from rank 0; Ray Data's per-epoch bars (drawn with terminal
    # cursor codes from a remote actor) would only clutter the job's log.
    train_ds.context.enable_progress_bars = False
    workers = cfg.workers
    resources = {"CPU": workers.cpus_per_worker}
    if workers.use_gpu:
        resources["GPU"] = 1
    if workers.node_resource:
        resources[workers.node_resource] = 1
    with relayed_logs() as mailbox:  # the workers' progress, shown by this driver
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "config": to_dict(cfg),
                "tracking_uri": uri,
                "mlflow_run_id": run_id,
                "log_mailbox": mailbox,
                "job_start": time.time(),
            },
            scaling_config=ray.train.ScalingConfig(
                # A (min, max) tuple makes the group elastic (Ray's form; the config holds it as a tuple already).
                num_workers=workers.num_workers,
                use_gpu=workers.use_gpu,
                resources_per_worker=resources,
                placement_strategy=workers.placement_strategy,
                elastic_resize_monitor_interval_s=workers.resize_check_s,
            ),
            run_config=ray.train.RunConfig(
                name=cfg.run.name,
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                failure_config=ray.train.FailureConfig(
                    max_failures=cfg.run.max_failures, max_preemption_failures=cfg.run.max_preemptions
                ),
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=cfg.run.num_to_keep,
                    checkpoint_score_attribute="val_psnr",
                    checkpoint_score_order="max",
                ),
            ),
            datasets={"train": train_ds},
            dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        )
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as exc:
            logger.end("FAILED")
            raise Interrupted(
                f"training run {cfg.run.name!r} failed: {exc}; its checkpoints are kept, and running the same "
                "command again resumes from the latest"
            ) from exc
    outcome_state = result.return_value or {}
    if outcome_state.get("status") == "nonfinite":
        logger.end("FAILED")
        kept = (
            f"the last good checkpoint is kept at {result.checkpoint.path}"
            if result.checkpoint
            else "no checkpoint had been written yet"
        )
        raise NonFiniteLossError(
            f"training run {cfg.run.name!r}: the loss became NaN/Inf at update {outcome_state.get('step')}; "
            f"stopped, {kept}. Lower train.lr or check the data."
        )
    best = result.get_best_checkpoint("val_psnr", "max") if result.checkpoint else None
    outcome = TrainOutcome(
        steps=int(outcome_state.get("step", 0)),
        metrics=dict(result.metrics or {}),
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
        best_checkpoint_path=best.path if best else None,
        mlflow_run_id=run_id,
    )
    if result.checkpoint is not None:
        best_metrics = next((m for c, m in result.best_checkpoints or () if best and c.path == best.path), {})
        logged = (("final", result.checkpoint, result.metrics), ("best", best, best_metrics))
        outcome.registered = _register_models(cfg, logger, logged)
    logger.end("FINISHED")
    return outcome


def _register_models(cfg: ExperimentConfig, logger: tracking.RunLogger, logged) -> dict[str, str]:
    """Log the final and best models as MLflow models, each with its validation metrics, and register them
    (aliases ``final`` and ``best``). ``logged``: (label, checkpoint or None, metrics) triples."""
    registered: dict[str, str] = {}
    for label, ckpt, metrics in logged:
        if ckpt is None:
            continue
        with ckpt.as_directory() as d:
            model_uri = log_model(logger, Path(d) / "model.pt", f"{tracking.MODEL_ARTIFACT}_{label}", metrics)
        if cfg.tracking.registered_model:
            version = logger.register(cfg.tracking.registered_model, model_uri, aliases=(label,))
            registered[label] = f"{cfg.tracking.registered_model}/{version}"
    return registered


def train(cfg: ExperimentConfig, *, source: str = "config") -> TrainOutcome:
    """Entry point for ``jobs/train.py``: connect to (or start) Ray, then run the training."""
    from edsr_ray.infra.ray import ensure_ray

    # The dashboard serves the state API that Ray Train's placement-group cleaner polls.
    ensure_ray(include_dashboard=True)
    return run_training(cfg, source=source)
