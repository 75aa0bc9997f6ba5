"""The training worker: what every Ray Train worker runs (:func:`train_loop_per_worker`), as in Ray's own Train
examples, with its pieces: :func:`prepare_for_training` (DDP and the update), :func:`validate` (PSNR/SSIM on whole
images, rank 0) and the checkpoint written after each validation. The driver that starts the workers is
:mod:`edsr_ray.training.run`.

Batch semantics: ``train.batch_size`` is the *global* batch (the paper's 16); each of the ``workers.num_workers``
workers takes ``batch_size / num_workers`` patches per update and DDP averages the gradients, so one update sees the
same number of patches whatever the cluster size, and the paper's learning-rate schedule applies unchanged. A resumed
worker restores the scheduler as saved: the learning rate continues exactly where it was (no double decay).
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edsr_ray import tracking
from edsr_ray.config import ExperimentConfig, from_dict
from edsr_ray.errors import EdsrRayError
from edsr_ray.training import batches as batches_lib
from edsr_ray.training.checkpoints import load_train_state, save_checkpoint, set_rng_state
from edsr_ray.training.update import LossWindow, UpdateStep

log = logging.getLogger(__name__)


def validate(
    model: torch.nn.Module, images: list[batches_lib.ValidationImage], device: torch.device, precision: str
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

    from edsr_ray.infra.ray import forward_logs
    from edsr_ray.models import build_model
    from edsr_ray.weights import init_from, load_matching

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
            from edsr_ray.weights import load_model

            load_matching(model, load_model(ckpt_dir).state_dict())
            train_state = load_train_state(Path(ckpt_dir), torch.device("cpu"))
        step = int(train_state["step"])
        log.info("rank %d resumed from step %d", rank, step)
    elif tcfg.init_from:
        init_from(model, tcfg.init_from)

    model, update, channels_last = prepare_for_training(model, cfg, device, world)
    if train_state is not None:
        update.load_state(train_state)
        set_rng_state(train_state["rng"])

    if loop_config.get("log_mailbox") is not None:  # the driver shows this worker's progress
        forward_logs(loop_config["log_mailbox"], f"rank {rank}")
    tracker = None
    if rank == 0 and loop_config.get("mlflow_run_id"):
        tracker = tracking.RunLogger(loop_config["mlflow_run_id"], loop_config["tracking_uri"])
    if tracker is not None and resumed is not None:
        tracker.log_metrics({"resumed_from_step": step}, step)
    val_images = batches_lib.validation_images(cfg.data, cfg.model.scales, storage=cfg.storage) if rank == 0 else []

    shard = ray.train.get_dataset_shard("train")
    per_worker = tcfg.batch_size // world
    # MDSR under DDP: the ranks agree on each update's scale over a CPU (gloo) group, so no GPU sync is involved.
    scale_group, multi_scale = None, len(cfg.model.scales) > 1 and world > 1
    if multi_scale and torch.distributed.get_backend() != "gloo":
        scale_group = torch.distributed.new_group(backend="gloo")
    # Every rank must take the same number of steps per epoch (DDP), whatever mix of scales its shard received: with
    # one scale exactly this many; with several the agreement ends the epoch on all ranks together, this is a cap.
    num_batches = batches_lib.batches_per_epoch(cfg.data, per_worker, world, cfg.model.scales)
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
        batches = batches_lib.iter_training_batches(
            shard,
            per_worker,
            cfg.model.scales,
            device=device,
            channels_last=channels_last,
            seed=tcfg.seed + 7919 * step + rank,
            num_batches=num_batches,
            # The same seed on every rank: the same scale draws (step is equal on all ranks at an epoch's start).
            agreement=batches_lib.ScaleAgreement(cfg.model.scales, tcfg.seed + 7919 * step, scale_group)
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
