"""One training update of the paper's recipe, and the loss checks between updates.

:class:`UpdateStep` (L1 loss, Adam, the step schedule; eager or compiled) and :class:`LossWindow` (losses kept on the
device and checked every few updates, so no update waits for the host) are the pieces every training worker runs
(:mod:`edsr_ray.training.loop`); ``benchmarks/bench_train.py`` times them.

The global batch at any group size (:func:`batch_share`): ``train.batch_size`` B is split unevenly over the W
workers of the current group (rank r takes ``B // W + (r < B % W)`` patches, so 16 over 3 is 6, 5, 5). DDP averages
the ranks' gradients (divides their sum by W), so each rank scales its mean loss by ``n_r * W / B``
(:func:`share_weight`): the averaged gradient is then exactly the mean over all B patches, as one process would
compute it (EDSR has no batch normalisation, so which rank holds which patch does not matter). Accumulating
micro-batches would be exact too but costs a forward/backward pass per micro-batch; the uneven split costs nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edsr_ray.errors import EdsrRayError


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


def batch_share(batch_size: int, world_size: int, rank: int) -> int:
    """Patches rank ``rank`` of ``world_size`` takes of a global batch of ``batch_size`` (shares differ by <= 1)."""
    if not 0 <= rank < world_size <= batch_size:
        raise EdsrRayError(f"rank {rank} of {world_size} workers cannot share a batch of {batch_size} patches")
    return batch_size // world_size + int(rank < batch_size % world_size)


def share_weight(batch_size: int, world_size: int, rank: int) -> float:
    """The factor on a rank's mean loss that makes DDP's average of the gradients the mean over the global batch."""
    return batch_share(batch_size, world_size, rank) * world_size / batch_size


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
    checkpoints, ``load_state`` restores them in either form. ``loss_weight`` (:func:`share_weight`) scales the loss
    before the backward pass, outside the compiled graph (so the graph does not depend on the rank's share).
    """

    def __init__(
        self, model: torch.nn.Module, cfg, device: torch.device, *, world_size: int = 1, loss_weight: float = 1.0
    ) -> None:
        self.model = model
        self.loss_weight = float(loss_weight)
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
            (loss * self.loss_weight if self.loss_weight != 1.0 else loss).backward()
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

    With workers of unequal shares each rank's loss counts by its ``weight`` (:func:`share_weight`), so the checked
    loss is the mean over the global batch. The same all-reduce carries the number of patches each update used
    (summed over the ranks: :attr:`patches`, one value per update of the last check) and any ``extra`` values the
    caller wants summed across the workers (:attr:`extra`), so that decisions shared by all ranks cost no collective
    of their own.
    """

    def __init__(self, size: int, device: torch.device, *, weight: float = 1.0) -> None:
        self._buffer = torch.zeros(2, size, dtype=torch.float32, device=device)  # losses, patches per update
        self._count = 0
        self.weight = float(weight)
        self.total, self.count = 0.0, 0  # finite losses since the last ``reset``
        self.patches = np.zeros(0)
        self.extra = np.zeros(0)

    def add(self, loss: torch.Tensor, patches: int = 0) -> None:
        if self._count == self._buffer.shape[1]:
            raise EdsrRayError("LossWindow is full: call check() every `size` updates at most")
        self._buffer[0, self._count] = loss
        self._buffer[1, self._count] = patches
        self._count += 1

    @property
    def full(self) -> bool:
        return self._count == self._buffer.shape[1]

    @property
    def pending(self) -> int:
        """Losses added since the last ``check``."""
        return self._count

    def check(self, world_size: int = 1, extra: tuple[float, ...] = ()) -> int | None:
        """Fold the pending losses in; returns the 0-based offset of the first non-finite one among them, or None.

        With several workers the losses are averaged across them first (a collective call: every worker must check
        at the same update), so all workers agree on the outcome.
        """
        n = self._count
        losses = self._buffer[0, :n] * self.weight
        flags = torch.tensor(extra, dtype=torch.float32, device=losses.device)
        packed = torch.cat([losses, self._buffer[1, :n], flags])
        if world_size > 1:
            # A sum, then divided (gloo had no AVG until 2025 releases): with the weights, the global batch's mean.
            torch.distributed.all_reduce(packed)
            packed[:n] /= world_size
        summed = packed.cpu().numpy().astype(np.float64)
        values, self.patches, self.extra = summed[:n], summed[n : 2 * n], summed[2 * n :]
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
