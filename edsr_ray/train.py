"""Distributed EDSR/MDSR training on Ray Train V2, fed by the Ray Data patch stream and tracked in MLflow.

Shape (as in Ray's own Train examples): :func:`train_loop_per_worker` runs on every worker; :class:`UpdateStep` (one
update), :class:`LossWindow` (loss checks without a host sync per update) and :func:`validate` are its pieces;
:func:`run_training` is the driver that builds the ``TorchTrainer``, and :func:`train` is what ``jobs/train.py`` calls.

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


def make_optimizer(
    model: torch.nn.Module, cfg, *, fused: bool = False, tensor_lr: bool = False, capturable: bool = False
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    """Adam and the step schedule of the paper (``cfg`` is a TrainConfig).

    ``fused``: one CUDA kernel for the whole update (GPU only). ``tensor_lr``: keep the learning rate in a tensor, so
    that a compiled optimizer step reads the scheduler's changes instead of recompiling on each of them.
    ``capturable``: keep Adam's step counts on the device, as CUDA graphs need (GPU only).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    lr = torch.tensor(cfg.lr) if tensor_lr else cfg.lr
    optimizer = torch.optim.Adam(
        params, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None, capturable=capturable
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    return optimizer, scheduler


# Adam options that choose how the update is computed, not what it computes.
_IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")


class UpdateStep:
    """One update of the paper recipe: L1 between the model's output and the HR patches, Adam, the step schedule.

    Eager (the default) or compiled with ``train.compile``. Eager on a GPU, Adam runs fused (one kernel for all
    parameters). Compiled, the forward pass and its loss become one ``torch.compile`` graph (forward and backward
    kernels generated and fused; on a single GPU captured in CUDA graphs, mode ``reduce-overhead``, which removes the
    kernel-launch cost that bounds small models at batch 16) and the Adam update a second one, with the learning rate
    in a tensor so that the schedule never recompiles it. With several workers the DDP model is compiled in the
    default mode (gradient all-reduces happen between graphs). The first updates of each scale pay the compilation
    (tens of seconds).

    ``model`` is the prepared (DDP-wrapped where distributed) model; ``optimizer`` and ``scheduler`` are exposed for
    checkpoints, ``load_state`` restores them in either form.
    """

    def __init__(self, model: torch.nn.Module, cfg, device: torch.device, *, world_size: int = 1) -> None:
        self.model = model
        self.autocast_dtype = _precision(cfg.precision, device)
        self.compiled = bool(cfg.compile)
        on_gpu = device.type == "cuda"
        self.optimizer, self.scheduler = make_optimizer(
            model,
            cfg,
            fused=on_gpu and not self.compiled,
            tensor_lr=self.compiled,
            capturable=on_gpu and self.compiled,
        )
        if self.compiled:
            mode = "reduce-overhead" if on_gpu and world_size == 1 else None
            self._loss = torch.compile(self._forward_loss, mode=mode, dynamic=False)
            optimizer = self.optimizer

            def adam_update() -> None:
                optimizer.step()

            self._apply = torch.compile(adam_update)
        else:
            self._loss, self._apply = self._forward_loss, self.optimizer.step

    def _forward_loss(self, lr: torch.Tensor, hr: torch.Tensor, scale: int) -> torch.Tensor:
        with torch.autocast(lr.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            sr = self.model(lr, scale)  # (B, 3, P*s, P*s)
        return F.l1_loss(sr.float(), hr)

    def __call__(self, lr: torch.Tensor, hr: torch.Tensor, scale: int) -> torch.Tensor:
        """One update on a batch; returns the loss as a detached 0-d tensor on the device (no host sync)."""
        self.optimizer.zero_grad(set_to_none=True)
        try:
            loss = self._loss(lr, hr, scale)
            loss.backward()
            self._apply()
        except torch._dynamo.exc.BackendCompilerFailed as exc:  # compiled lazily: first call, each new scale
            cause = getattr(exc, "inner_exception", None) or exc.__cause__ or exc
            lines = str(cause).strip().splitlines()
            reason = f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__
            raise EdsrRayError(
                f"train.compile=true: torch.compile could not compile the update on {lr.device} ({reason}); "
                "set train.compile=false to train without it"
            ) from exc
        self.scheduler.step()
        return loss.detach().clone()  # a CUDA-graph output is overwritten by the next replay

    @property
    def lr(self) -> float:
        """The learning rate of the next update."""
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state(self, train_state: dict[str, Any]) -> None:
        """Restore optimizer and schedule from a checkpoint written by either form (float or tensor learning rate).

        The checkpoint's Adam implementation flags are replaced by this step's before loading (``load_state_dict``
        would otherwise bring back the writer's fused/capturable choice, and place the moments by it).
        """
        saved = dict(train_state["optimizer"])
        saved["param_groups"] = [
            {**group, **{k: live[k] for k in _IMPLEMENTATION_FLAGS if k in live}}
            for group, live in zip(saved["param_groups"], self.optimizer.param_groups)
        ]
        self.optimizer.load_state_dict(saved)
        self.scheduler.load_state_dict(train_state["scheduler"])
        for group in self.optimizer.param_groups:
            value = float(group["lr"])
            group["lr"] = torch.tensor(value) if self.compiled else value
        self.scheduler.base_lrs = [float(v) for v in self.scheduler.base_lrs]
        self.scheduler._last_lr = [float(group["lr"]) for group in self.optimizer.param_groups]


class LossWindow:
    """Per-update losses kept on the device between checks, so that an update never waits for the host.

    Reading a loss back after every update (as a plain loop does) stalls the GPU each time; here the losses are
    written into a device buffer and read, all-reduced across the workers, once per ``check``: every ``log_every``
    updates and before each validation/checkpoint, so a non-finite loss is still caught before a checkpoint could
    save its weights, and the exact update where it appeared is still known.
    """

    def __init__(self, size: int, device: torch.device) -> None:
        self._buffer = torch.zeros(size, dtype=torch.float32, device=device)
        self._count = 0
        self.total, self.count = 0.0, 0  # finite losses since the last ``reset``

    def add(self, loss: torch.Tensor) -> None:
        if self._count == self._buffer.numel():
            raise EdsrRayError("LossWindow is full: call check() every `size` updates at most")
        self._buffer[self._count] = loss
        self._count += 1

    @property
    def full(self) -> bool:
        return self._count == self._buffer.numel()

    @property
    def pending(self) -> int:
        """Losses added since the last ``check``."""
        return self._count

    def check(self, world_size: int = 1) -> int | None:
        """Fold the pending losses in; returns the 0-based offset of the first non-finite one among them, or None.

        With several workers the losses are averaged across them first (a collective call: every worker must check
        at the same update), so all workers agree on the outcome.
        """
        pending = self._buffer[: self._count]
        if world_size > 1:
            pending = pending.clone()
            torch.distributed.all_reduce(pending)  # a sum, then divided: gloo had no AVG until 2025 releases
            pending /= world_size
        values = pending.cpu().numpy().astype(np.float64)
        self._count = 0
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            return int(bad[0])
        self.total += float(values.sum())
        self.count += values.size
        return None

    @property
    def mean(self) -> float:
        return self.total / max(self.count, 1)

    def reset(self) -> None:
        self.total, self.count = 0.0, 0


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
    directory: Path, model: torch.nn.Module, update: UpdateStep, step: int, meta: dict[str, Any]
) -> None:
    """Write a complete training checkpoint into ``directory`` (plain tensors and types: loads with weights_only)."""
    from edsr_ray.models import save_model

    save_model(model, directory / "model.pt")
    torch.save(
        {
            **update.state_dict(),
            "step": step,
            "rng": _rng_state(),
        },
        directory / TRAIN_STATE,
    )
    (directory / META).write_text(json.dumps({"step": step, **meta}, indent=2, sort_keys=True))


def load_train_state(directory: Path, device: torch.device) -> dict[str, Any]:
    return torch.load(directory / TRAIN_STATE, map_location=device, weights_only=True)


def prepare_for_training(
    model: torch.nn.Module, cfg: ExperimentConfig, device: torch.device, world_size: int
) -> tuple[torch.nn.Module, UpdateStep, bool]:
    """What every training worker does to its built model: channels_last on a GPU, DDP through Ray Train, and the
    update. Returns the prepared model, its :class:`UpdateStep` and whether batches should be channels_last."""
    import ray.train.torch

    channels_last = cfg.train.channels_last and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # MDSR trains one upsampling branch per batch: the others get no gradient in that step.
    ddp_kwargs = {"find_unused_parameters": len(cfg.model.scales) > 1}
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_kwargs)
    return model, UpdateStep(model, cfg.train, device, world_size=world_size), channels_last


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

    model, update, channels_last = prepare_for_training(model, cfg, device, world)
    if train_state is not None:
        update.load_state(train_state)
        _set_rng_state(train_state["rng"])

    tracker = None
    if rank == 0 and loop_config.get("mlflow_run_id"):
        tracker = tracking.RunLogger(loop_config["mlflow_run_id"], loop_config["tracking_uri"])
    if tracker is not None and resumed is not None:
        tracker.log_metrics({"resumed_from_step": step}, step)
    val_images = data_lib.validation_images(cfg.data, cfg.model.scales, storage=cfg.storage) if rank == 0 else []

    shard = ray.train.get_dataset_shard("train")
    per_worker = tcfg.batch_size // world
    # MDSR under DDP: the ranks agree on each update's scale over a CPU (gloo) group, so no GPU sync is involved.
    scale_group, multi_scale = None, len(cfg.model.scales) > 1 and world > 1
    if multi_scale and torch.distributed.get_backend() != "gloo":
        scale_group = torch.distributed.new_group(backend="gloo")
    # Every rank must take the same number of steps per epoch (DDP), whatever mix of scales its shard received: with
    # one scale exactly this many; with several the agreement ends the epoch on all ranks together, this is a cap.
    num_batches = data_lib.batches_per_epoch(cfg.data, per_worker, world, cfg.model.scales)
    if num_batches < 1:
        raise EdsrRayError(
            f"data.epoch_patches={cfg.data.epoch_patches} is too small for {world} workers with a batch of "
            f"{per_worker} each at scales {list(cfg.model.scales)}: raise data.epoch_patches"
        )
    best_psnr = float(loop_config.get("best_psnr", -math.inf))
    losses = LossWindow(tcfg.log_every, device)
    window_start, window_updates = time.perf_counter(), 0
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
            # The same seed on every rank: the same scale draws (step is equal on all ranks at an epoch's start).
            agreement=data_lib.ScaleAgreement(cfg.model.scales, tcfg.seed + 7919 * step, scale_group)
            if multi_scale
            else None,
        )
        epoch_start = step
        for lr, hr, scale in batches:
            losses.add(update(lr, hr, scale))
            step += 1
            window_updates += 1
            log_now = step % tcfg.log_every == 0
            validate_now = step % tcfg.val_every == 0 or step == tcfg.total_steps
            if log_now or validate_now or losses.full:
                # The losses of the last updates, averaged across ranks: every rank takes the same decision.
                pending = losses.pending
                bad = losses.check(world)
                if bad is not None:
                    step = step - pending + bad + 1  # the update whose loss was first non-finite
                    status = "nonfinite"
                    break
            if log_now:
                elapsed = time.perf_counter() - window_start
                if tracker is not None:
                    tracker.log_metrics(
                        {
                            "loss": losses.mean,
                            "lr": update.lr,
                            "patches_per_s": window_updates * tcfg.batch_size / elapsed,
                            "epoch": epoch,
                        },
                        step,
                    )
                if rank == 0:
                    log.info("step %d/%d loss %.4f lr %.3g", step, tcfg.total_steps, losses.mean, update.lr)
                losses.reset()
                window_start, window_updates = time.perf_counter(), 0
            if validate_now:
                best_psnr = _validate_and_checkpoint(
                    model, update, step, rank, val_images, device, tcfg.precision, tracker, best_psnr, loop_config
                )
                window_start, window_updates = time.perf_counter(), 0
            if step >= tcfg.total_steps:
                break
        if status == "finished" and step == epoch_start:
            raise EdsrRayError(
                f"epoch {epoch} gave no batch of {per_worker} patches at one scale on every worker: raise "
                f"data.epoch_patches (now {cfg.data.epoch_patches})"
            )
    if status == "nonfinite" and tracker is not None:
        tracker.log_text(f"loss became non-finite at update {step}\n", "errors/nonfinite_loss.txt")
    return {"status": status, "step": step, "best_psnr": best_psnr}


def _validate_and_checkpoint(
    model, update, step, rank, val_images, device, precision, tracker, best_psnr, loop_config
) -> float:
    """Rank 0 validates and writes the checkpoint; every rank reports (``ray.train.report`` is a barrier)."""
    import ray.train

    metrics: dict[str, float] = {"step": float(step)}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return best_psnr
    val_metrics, picture = validate(model, val_images, device, precision) if val_images else ({}, None)
    metrics.update(val_metrics)
    metrics["lr"] = update.lr
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
            update,
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
    local = storage.local_path(path).resolve()  # a plain path or a file:// URI (config validation refused others)
    local.mkdir(parents=True, exist_ok=True)
    return str(local), None


def _has_checkpoints(cfg: ExperimentConfig) -> bool:
    """Whether the run already wrote a checkpoint (Ray Train will then resume it)."""
    from edsr_ray import storage

    base = cfg.run.storage_path
    run_dir = storage.join(base, cfg.run.name) if storage.is_s3(base) else str(storage.local_path(base) / cfg.run.name)
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
    # One progress line per log_every updates comes from rank 0; Ray Data's per-epoch bars (drawn with terminal
    # cursor codes from a remote actor) would only clutter the job's log.
    train_ds.context.enable_progress_bars = False
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
            model_uri = logger.log_model(Path(d) / "model.pt", f"{tracking.MODEL_ARTIFACT}_{label}", metrics)
        if cfg.tracking.registered_model:
            version = logger.register(cfg.tracking.registered_model, model_uri, aliases=(label,))
            registered[label] = f"{cfg.tracking.registered_model}/{version}"
    return registered


def train(cfg: ExperimentConfig, *, source: str = "config") -> TrainOutcome:
    """Entry point for ``jobs/train.py``: connect to (or start) Ray, then run the training."""
    from edsr_ray.raycluster import ensure_ray

    # The dashboard serves the state API that Ray Train's placement-group cleaner polls.
    ensure_ray(log_to_driver=True, include_dashboard=True)
    return run_training(cfg, source=source)
