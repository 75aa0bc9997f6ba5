"""Distributed EDSR/MDSR training on Ray Train V2, fed by the Ray Data patch stream and tracked in MLflow.

Shape (as in Ray's own Train examples): :func:`train_loop_per_worker` runs on every worker; :func:`train_one_step`
and :func:`validate` are its pieces; :func:`run_training` is the driver that builds the ``TorchTrainer``, and
:func:`train` is what ``jobs/train.py`` calls.

Batch semantics: ``train.batch_size`` is the *global* batch (the paper's 16); each of the ``workers.num_workers``
workers takes ``batch_size / num_workers`` patches per update and DDP averages the gradients, so one update sees the
same number of patches whatever the cluster size, and the paper's learning-rate schedule applies unchanged.

Checkpoints (every ``train.val_every`` updates, after validation) hold ``model.pt`` (weights + full model config:
:func:`edsr_ray.models.load_model` reads the checkpoint folder directly), ``train_state.pt`` (optimizer, scheduler,
step, RNG states) and ``meta.json``. Re-running the same ``run.name`` + ``run.storage_path`` resumes from the latest
checkpoint with the scheduler restored as saved: the learning rate continues exactly where it was (no double decay).
"""

from __future__ import annotations

import json
import logging
import math
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edsr_ray import data as data_lib
from edsr_ray import tracking
from edsr_ray.config import ExperimentConfig, flatten, from_dict, to_dict
from edsr_ray.errors import EdsrRayError

log = logging.getLogger(__name__)

TRAIN_STATE = "train_state.pt"
META = "meta.json"


class NonFiniteLossError(EdsrRayError):
    """The loss became NaN or Inf; training stopped and the last good checkpoint was kept."""


# --------------------------------------------------------------------------------------------------------------------
# Worker side


def _precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for the forward pass: bf16 on GPU by default, none (fp32) on CPU."""
    if device.type != "cuda" or precision == "fp32":
        return None
    return torch.bfloat16


def make_optimizer(model: torch.nn.Module, cfg) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    """Adam and the step schedule of the paper (``cfg`` is a TrainConfig)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    return optimizer, scheduler


def train_one_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    lr: torch.Tensor,
    hr: torch.Tensor,
    scale: int,
    autocast_dtype: torch.dtype | None,
) -> torch.Tensor:
    """One update: L1 between the model's output and the HR patches; returns the (detached) loss."""
    with torch.autocast(device_type=lr.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        sr = model(lr, scale)  # (B, 3, P*s, P*s)
        loss = F.l1_loss(sr.float(), hr)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.detach()


def validate(
    model: torch.nn.Module, images: list[data_lib.ValidationImage], device: torch.device, precision: str
) -> tuple[dict[str, float], np.ndarray | None]:
    """PSNR/SSIM per scale on whole validation images (tiled), with bicubic's on the same images for reference.

    Returns the metrics and a comparison picture (bicubic | model | HR) of the first image.
    """
    from edsr_ray.imaging import imresize
    from edsr_ray.inference import upscale
    from edsr_ray.metrics import psnr, ssim

    net = getattr(model, "module", model)
    was_training = net.training
    net.eval()
    sums: dict[str, list[float]] = {}
    picture = None
    for item in images:
        sr = upscale(net, item.lr, item.scale, precision=precision, device=device)
        bicubic = imresize(item.lr, item.scale)
        for name, img in (("", sr), ("bicubic_", bicubic)):
            sums.setdefault(f"val_{name}psnr_x{item.scale}", []).append(psnr(img, item.hr, item.scale, item.protocol))
            sums.setdefault(f"val_{name}ssim_x{item.scale}", []).append(ssim(img, item.hr, item.scale, item.protocol))
        if picture is None:
            h, w = sr.shape[:2]
            picture = tracking.comparison_picture(bicubic[:h, :w], sr, item.hr[:h, :w])
    net.train(was_training)
    metrics = {k: float(np.mean(v)) for k, v in sums.items()}
    psnrs = [v for k, v in metrics.items() if k.startswith("val_psnr_x")]
    if psnrs:
        metrics["val_psnr"] = float(np.mean(psnrs))
    return metrics, picture


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np_state = np.random.get_state()
    np.random.set_state((np_state[0], state["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    directory: Path, model: torch.nn.Module, optimizer, scheduler, step: int, meta: dict[str, Any]
) -> None:
    """Write a complete training checkpoint into ``directory`` (plain tensors and types: loads with weights_only)."""
    from edsr_ray.models import save_model

    save_model(model, directory / "model.pt")
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "rng": _rng_state(),
        },
        directory / TRAIN_STATE,
    )
    (directory / META).write_text(json.dumps({"step": step, **meta}, indent=2, sort_keys=True))


def load_train_state(directory: Path, device: torch.device) -> dict[str, Any]:
    return torch.load(directory / TRAIN_STATE, map_location=device, weights_only=True)


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """The Ray Train worker: build, maybe resume, then train until ``train.total_steps`` updates."""
    import ray.train
    import ray.train.torch

    from edsr_ray.models import build_model, init_from, load_matching

    cfg = from_dict(ExperimentConfig, loop_config["config"], source="train_loop_config")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    tcfg = cfg.train
    torch.manual_seed(tcfg.seed + rank)
    random.seed(tcfg.seed + rank)
    np.random.seed(tcfg.seed + rank)

    model = build_model(cfg.model)
    step = 0
    resumed = ray.train.get_checkpoint()
    train_state = None
    if resumed is not None:
        with resumed.as_directory() as ckpt_dir:
            from edsr_ray.models import load_model

            load_matching(model, load_model(ckpt_dir).state_dict())
            train_state = load_train_state(Path(ckpt_dir), torch.device("cpu"))
        step = int(train_state["step"])
        log.info("rank %d resumed from step %d", rank, step)
    elif tcfg.init_from:
        init_from(model, tcfg.init_from)

    autocast_dtype = _precision(tcfg.precision, device)
    channels_last = tcfg.channels_last and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # MDSR trains one upsampling branch per batch: the others get no gradient in that step.
    ddp_kwargs = {"find_unused_parameters": len(cfg.model.scales) > 1}
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_kwargs)
    if tcfg.compile and device.type == "cuda":
        model = torch.compile(model)
    optimizer, scheduler = make_optimizer(model, tcfg)
    if train_state is not None:
        optimizer.load_state_dict(train_state["optimizer"])
        scheduler.load_state_dict(train_state["scheduler"])
        _set_rng_state(train_state["rng"])

    tracker = None
    if rank == 0 and loop_config.get("mlflow_run_id"):
        tracker = tracking.RunLogger(loop_config["mlflow_run_id"], loop_config["tracking_uri"])
    if tracker is not None and resumed is not None:
        tracker.log_metrics({"resumed_from_step": step}, step)
    val_images = data_lib.validation_images(cfg.data, cfg.model.scales, storage=cfg.storage) if rank == 0 else []

    shard = ray.train.get_dataset_shard("train")
    per_worker = tcfg.batch_size // world
    # Every rank must take the same number of steps per epoch (DDP), whatever mix of scales its shard received.
    num_batches = data_lib.batches_per_epoch(cfg.data, per_worker, world, cfg.model.scales)
    if num_batches < 1:
        raise EdsrRayError(
            f"data.epoch_patches={cfg.data.epoch_patches} is too small for {world} workers with a batch of "
            f"{per_worker} each at scales {list(cfg.model.scales)}: raise data.epoch_patches"
        )
    best_psnr = float(loop_config.get("best_psnr", -math.inf))
    window_loss, window_n, window_start = 0.0, 0, time.perf_counter()
    status = "finished"
    epoch = 0
    while step < tcfg.total_steps and status == "finished":
        epoch += 1
        batches = data_lib.iter_training_batches(
            shard,
            per_worker,
            cfg.model.scales,
            device=device,
            channels_last=channels_last,
            seed=tcfg.seed + 7919 * step + rank,
            num_batches=num_batches,
        )
        for lr, hr, scale in batches:
            loss = train_one_step(model, optimizer, scheduler, lr, hr, scale, autocast_dtype)
            step += 1
            # Every rank must agree on a non-finite loss in the same step, or the others would wait forever in the
            # next gradient all-reduce: average the loss across ranks (also the number worth logging).
            if world > 1:
                torch.distributed.all_reduce(loss, op=torch.distributed.ReduceOp.AVG)
            loss_value = float(loss)
            if not math.isfinite(loss_value):
                status = "nonfinite"
                break
            window_loss += loss_value
            window_n += 1
            if tracker is not None and step % tcfg.log_every == 0:
                elapsed = time.perf_counter() - window_start
                tracker.log_metrics(
                    {
                        "loss": window_loss / window_n,
                        "lr": scheduler.get_last_lr()[0],
                        "patches_per_s": window_n * tcfg.batch_size / elapsed,
                        "epoch": epoch,
                    },
                    step,
                )
            if step % tcfg.log_every == 0:
                log.info("step %d/%d loss %.4f", step, tcfg.total_steps, window_loss / max(window_n, 1))
                window_loss, window_n, window_start = 0.0, 0, time.perf_counter()
            if step % tcfg.val_every == 0 or step == tcfg.total_steps:
                best_psnr = _validate_and_checkpoint(
                    model,
                    optimizer,
                    scheduler,
                    step,
                    rank,
                    val_images,
                    device,
                    tcfg.precision,
                    tracker,
                    best_psnr,
                    loop_config,
                )
                window_start = time.perf_counter()
            if step >= tcfg.total_steps:
                break
    if status == "nonfinite" and tracker is not None:
        tracker.log_text(f"loss became non-finite at update {step}\n", "errors/nonfinite_loss.txt")
    return {"status": status, "step": step, "best_psnr": best_psnr}


def _validate_and_checkpoint(
    model, optimizer, scheduler, step, rank, val_images, device, precision, tracker, best_psnr, loop_config
) -> float:
    """Rank 0 validates and writes the checkpoint; every rank reports (``ray.train.report`` is a barrier)."""
    import ray.train

    metrics: dict[str, float] = {"step": float(step)}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return best_psnr
    val_metrics, picture = validate(model, val_images, device, precision) if val_images else ({}, None)
    metrics.update(val_metrics)
    metrics["lr"] = scheduler.get_last_lr()[0]
    score = metrics.get("val_psnr", float(step))
    metrics["val_psnr"] = score  # the checkpoint score attribute must always be present
    best_psnr = max(best_psnr, score)
    if tracker is not None:
        tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step)
        if picture is not None and loop_config["config"]["tracking"]["log_images"]:
            tracker.log_image(picture, f"validation/step_{step:08d}.png")
    log.info("step %d validation %s", step, {k: round(v, 4) for k, v in val_metrics.items()})
    with tempfile.TemporaryDirectory(prefix="edsr-ckpt-") as tmp:
        save_checkpoint(
            Path(tmp),
            model,
            optimizer,
            scheduler,
            step,
            {"metrics": metrics, "mlflow_run_id": loop_config.get("mlflow_run_id")},
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    return best_psnr


# --------------------------------------------------------------------------------------------------------------------
# Driver side


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

    path = cfg.run.storage_path
    if storage.is_s3(path):
        fs, fs_path = storage.resolve_pyarrow(path, cfg.storage)
        return fs_path, fs
    local = Path(path).expanduser().resolve()
    local.mkdir(parents=True, exist_ok=True)
    return str(local), None


def _has_checkpoints(cfg: ExperimentConfig) -> bool:
    """Whether the run already wrote a checkpoint (Ray Train will then resume it)."""
    from edsr_ray import storage

    base = cfg.run.storage_path
    run_dir = storage.join(base, cfg.run.name) if storage.is_s3(base) else str(Path(base).expanduser() / cfg.run.name)
    try:
        return any(uri.endswith("/" + TRAIN_STATE) for uri in storage.list_files(run_dir, cfg.storage))
    except storage.NotFoundError:
        return False


def preflight(cfg: ExperimentConfig) -> str:
    """Checks that fail within seconds and before any cluster work: data, tracking, initial weights."""
    uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    tracking.check_tracking_uri(uri)
    data_lib.check_dataset(cfg.data, cfg.model.scales, storage=cfg.storage)
    if cfg.train.init_from:
        from edsr_ray.models import build_model, init_from

        init_from(build_model(cfg.model), cfg.train.init_from)  # wrong architecture: clear error now
    return uri


def run_training(cfg: ExperimentConfig, *, source: str = "config") -> TrainOutcome:
    """Build and fit the ``TorchTrainer``; register the final and best models in MLflow."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    uri = preflight(cfg)
    storage_path, storage_fs = _storage_for_run(cfg)
    run_key = f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}"
    resume = _has_checkpoints(cfg)
    run_id = tracking.find_or_create_run(cfg.tracking, run_key, cfg.run.name, uri, resume=resume)
    if resume:
        log.info("run %s has checkpoints in %s: resuming from the latest", cfg.run.name, cfg.run.storage_path)
    logger = tracking.RunLogger(run_id, uri)
    logger.log_params({**flatten(cfg), "config_source": source})
    logger.log_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True), "config.json")

    train_ds = data_lib.patch_dataset(cfg.data, cfg.model.scales, storage=cfg.storage, split="train")
    workers = cfg.workers
    resources = {"CPU": workers.cpus_per_worker}
    if workers.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "tracking_uri": uri, "mlflow_run_id": run_id},
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers.num_workers,
            use_gpu=workers.use_gpu,
            resources_per_worker=resources,
            placement_strategy=workers.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
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
        raise EdsrRayError(f"training run {cfg.run.name!r} failed: {exc}") from exc
    outcome_state = result.return_value or {}
    if outcome_state.get("status") == "nonfinite":
        logger.end("FAILED")
        last = result.checkpoint.path if result.checkpoint else "none"
        raise NonFiniteLossError(
            f"training run {cfg.run.name!r}: the loss became NaN/Inf at update {outcome_state.get('step')}; "
            f"stopped, the last good checkpoint is kept at {last}. Lower train.lr or check the data."
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
        outcome.registered = _register_models(cfg, logger, result.checkpoint, best)
    logger.end("FINISHED")
    return outcome


def _register_models(cfg: ExperimentConfig, logger: tracking.RunLogger, final, best) -> dict[str, str]:
    """Log the final and best model files and register them (aliases ``latest-run`` and ``best``)."""
    registered: dict[str, str] = {}
    for label, ckpt in (("final", final), ("best", best)):
        if ckpt is None:
            continue
        with ckpt.as_directory() as d:
            logger.log_model_file(Path(d) / "model.pt", artifact_path=f"{tracking.MODEL_ARTIFACT}_{label}")
        if cfg.tracking.registered_model:
            version = logger.register(
                cfg.tracking.registered_model, artifact_path=f"{tracking.MODEL_ARTIFACT}_{label}", aliases=(label,)
            )
            registered[label] = f"{cfg.tracking.registered_model}/{version}"
    return registered


def train(cfg: ExperimentConfig, *, source: str = "config") -> TrainOutcome:
    """Entry point for ``jobs/train.py``: connect to (or start) Ray, then run the training."""
    from edsr_ray.raycluster import ensure_ray

    # The dashboard serves the state API that Ray Train's placement-group cleaner polls.
    ensure_ray(log_to_driver=True, include_dashboard=True)
    return run_training(cfg, source=source)
