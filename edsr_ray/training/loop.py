"""The training worker: what every Ray Train worker runs (:func:`train_loop_per_worker`), as in Ray's own Train
examples, with its pieces: :func:`prepare_for_training` (DDP and the update), :func:`validate` (PSNR/SSIM on whole
images, rank 0) and the checkpoint written after each validation. The driver that starts the workers is
:mod:`edsr_ray.training.run`.

Batch semantics: ``train.batch_size`` is the *global* batch (the paper's 16) at every update, whatever the size W of
the current worker group: rank r takes its share (``B // W`` or one more, :func:`~edsr_ray.training.update.batch_share`)
and weights its loss so that DDP's average is the gradient over all B patches; so the paper's learning-rate schedule
applies unchanged. The schedule counts updates and is restored from the checkpoint: after a resume or a resize the
learning rate continues exactly where it was (no double decay). Each update's patch count, summed over the ranks, is
checked and logged (``patches_per_update_min``/``_max``).

Checkpoints: after each validation (``train.val_every``); by time (``run.checkpoint_every_s``) and when Ray announces
the preemption of a node of the group, without validation (:mod:`edsr_ray.training.elastic`).
"""

from __future__ import annotations

import json
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
from edsr_ray.training import elastic
from edsr_ray.training.checkpoints import META, load_train_state, save_checkpoint, set_rng_state
from edsr_ray.training.update import LossWindow, UpdateStep, batch_share, share_weight

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
    model: torch.nn.Module, cfg: ExperimentConfig, device: torch.device, world_size: int, rank: int = 0
) -> tuple[torch.nn.Module, UpdateStep, bool]:
    """What every training worker does to its built model: channels_last on a GPU, DDP through Ray Train, and the
    update (weighted for this rank's share of the global batch). Returns the prepared model, its
    :class:`UpdateStep` and whether batches should be channels_last."""
    import ray.train.torch

    channels_last = cfg.train.channels_last and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # MDSR trains one upsampling branch per batch: the others get no gradient in that step.
    ddp_kwargs = {"find_unused_parameters": len(cfg.model.scales) > 1}
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_kwargs)
    weight = share_weight(cfg.train.batch_size, world_size, rank)
    update = UpdateStep(model, cfg.train, device, world_size=world_size, loss_weight=weight)
    return model, update, channels_last


# Score of a checkpoint written without validation (by time, on a preemption notice): below any PSNR, so that such a
# checkpoint never counts as the best one and is pruned first (Ray keeps the latest anyway). Finite on purpose: Ray's
# checkpoint bookkeeping would turn -inf into null.
UNVALIDATED_SCORE = -1.0


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
    train_state, resumed_meta = None, None
    if resumed is not None:
        with resumed.as_directory() as ckpt_dir:
            from edsr_ray.weights import load_model

            load_matching(model, load_model(ckpt_dir).state_dict())
            train_state = load_train_state(Path(ckpt_dir), torch.device("cpu"))
            resumed_meta = json.loads((Path(ckpt_dir) / META).read_text())
        step = int(train_state["step"])
        log.info("rank %d of %d resumed from step %d", rank, world, step)
    elif tcfg.init_from:
        init_from(model, tcfg.init_from)

    model, update, channels_last = prepare_for_training(model, cfg, device, world, rank)
    if train_state is not None:
        update.load_state(train_state)
        set_rng_state(train_state["rng"])

    if loop_config.get("log_mailbox") is not None:  # the driver shows this worker's progress
        forward_logs(loop_config["log_mailbox"], f"rank {rank}")
    tracker = None
    if rank == 0 and loop_config.get("mlflow_run_id"):
        tracker = tracking.RunLogger(loop_config["mlflow_run_id"], loop_config["tracking_uri"])
    if tracker is not None:
        if resumed is not None:
            tracker.log_metrics({"resumed_from_step": step}, step)
        elastic.record_group_start(tracker, world, step, resumed_meta, loop_config.get("job_start"))
    val_images = batches_lib.validation_images(cfg.data, cfg.model.scales, storage=cfg.storage) if rank == 0 else []

    shard = ray.train.get_dataset_shard("train")
    share = batch_share(tcfg.batch_size, world, rank)
    # MDSR under DDP: the ranks agree on each update's scale over a CPU (gloo) group, so no GPU sync is involved.
    scale_group, multi_scale = None, len(cfg.model.scales) > 1 and world > 1
    if multi_scale and torch.distributed.get_backend() != "gloo":
        scale_group = torch.distributed.new_group(backend="gloo")
    # Every rank must take the same number of steps per epoch (DDP), whatever mix of scales its shard received: with
    # one scale exactly this many; with several the agreement ends the epoch on all ranks together, this is a cap.
    # Every rank receives the same number of patches; the rank with the largest share runs out first.
    largest = batch_share(tcfg.batch_size, world, 0)
    num_batches = batches_lib.batches_per_epoch(cfg.data, largest, world, cfg.model.scales)
    if num_batches < 1:
        raise EdsrRayError(
            f"data.epoch_patches={cfg.data.epoch_patches} is too small for {world} workers with a batch of up to "
            f"{largest} each at scales {list(cfg.model.scales)}: raise data.epoch_patches"
        )
    best_psnr = float(loop_config.get("best_psnr", -math.inf))
    losses = LossWindow(tcfg.log_every, device, weight=share_weight(tcfg.batch_size, world, rank))
    clock = elastic.CheckpointClock(cfg.run.checkpoint_every_s)
    notice = None  # the preemption Ray announced for this group; kept in every later checkpoint of the group
    window_start, window_updates = time.perf_counter(), 0
    window_patches: list[float] = []
    status = "finished"
    epoch = 0
    while step < tcfg.total_steps and status == "finished":
        epoch += 1
        batches = batches_lib.iter_training_batches(
            shard,
            share,
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
            losses.add(update(lr, hr, scale), patches=len(lr))
            step += 1
            window_updates += 1
            log_now = step % tcfg.log_every == 0
            validate_now = step % tcfg.val_every == 0 or step == tcfg.total_steps
            checkpoint_reason = None
            if log_now or validate_now or losses.full:
                # The losses of the last updates, averaged across ranks: every rank takes the same decision. Rank 0's
                # clock rides along: time for a checkpoint on every rank at once.
                pending = losses.pending
                bad = losses.check(world, extra=(float(rank == 0 and clock.due()),))
                if bad is not None:
                    step = step - pending + bad + 1  # the update whose loss was first non-finite
                    status = "nonfinite"
                    break
                window_patches += losses.patches.tolist()
                if losses.extra[0] > 0:
                    checkpoint_reason = "time"
            if log_now and notice is None:
                notice = elastic.preemption_notice()  # a collective, every log_every updates on every rank
                if notice is not None:
                    checkpoint_reason = "preemption"
                    if rank == 0:
                        log.info("preemption announced for ranks %s at update %d: checkpointing", notice["ranks"], step)
            if log_now:
                elapsed = time.perf_counter() - window_start
                if tracker is not None:
                    tracker.log_metrics(
                        {
                            "loss": losses.mean,
                            "lr": update.lr,
                            "patches_per_s": window_updates * tcfg.batch_size / elapsed,
                            "patches_per_update_min": min(window_patches),
                            "patches_per_update_max": max(window_patches),
                            "epoch": epoch,
                            elastic.WORKERS_METRIC: world,
                        },
                        step,
                    )
                if rank == 0:
                    log.info("step %d/%d loss %.4f lr %.3g", step, tcfg.total_steps, losses.mean, update.lr)
                losses.reset()
                window_start, window_updates, window_patches = time.perf_counter(), 0, []
            if validate_now or checkpoint_reason is not None:
                best_psnr = _checkpoint(
                    model,
                    update,
                    step,
                    rank,
                    world,
                    val_images if validate_now else None,
                    device,
                    tcfg.precision,
                    tracker,
                    best_psnr,
                    loop_config,
                    reason="validation" if validate_now else checkpoint_reason,
                    notice=notice,
                )
                if rank == 0:
                    clock.reset()
                window_start, window_updates = time.perf_counter(), 0
            if step >= tcfg.total_steps:
                break
        if status == "finished" and step == epoch_start:
            raise EdsrRayError(
                f"epoch {epoch} gave no batch of {share} patches at one scale on every worker: raise "
                f"data.epoch_patches (now {cfg.data.epoch_patches})"
            )
    if status == "nonfinite" and tracker is not None:
        tracker.log_text(f"loss became non-finite at update {step}\n", "errors/nonfinite_loss.txt")
    return {"status": status, "step": step, "best_psnr": best_psnr}


def _checkpoint(
    model, update, step, rank, world, val_images, device, precision, tracker, best_psnr, loop_config, *, reason, notice
) -> float:
    """Rank 0 validates (``val_images`` not None) and writes the checkpoint; every rank reports (``ray.train.report``
    is a barrier). ``reason``: validation, time or preemption; ``notice``: the group's preemption notice, if any."""
    import ray.train

    metrics: dict[str, float] = {"step": float(step)}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return best_psnr
    metrics["lr"] = update.lr
    if val_images is None:
        metrics["val_psnr"] = UNVALIDATED_SCORE  # the checkpoint score attribute must always be present
        log.info("step %d checkpoint (%s)", step, reason)
    else:
        val_metrics, picture = validate(model, val_images, device, precision) if val_images else ({}, None)
        metrics.update(val_metrics)
        score = metrics.get("val_psnr", float(step))
        metrics["val_psnr"] = score
        best_psnr = max(best_psnr, score)
        if tracker is not None:
            tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step)
            if picture is not None and loop_config["config"]["tracking"]["log_images"]:
                tracker.log_image(picture, f"validation/step_{step:08d}.png")
        log.info("step %d validation %s", step, {k: round(v, 4) for k, v in val_metrics.items()})
    meta = {
        "metrics": metrics,
        "mlflow_run_id": loop_config.get("mlflow_run_id"),
        "reason": reason,
        "workers": world,
        "time": time.time(),
        "notice": notice,
    }
    with tempfile.TemporaryDirectory(prefix="edsr-ckpt-") as tmp:
        save_checkpoint(Path(tmp), model, update, step, meta)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    return best_psnr
