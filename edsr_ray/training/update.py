"""One training update of the paper's recipe, and the loss checks between updates.

:class:`UpdateStep` (L1 loss, Adam, the step schedule; eager or compiled) and :class:`LossWindow` (losses kept on the
device and checked every few updates, so no update waits for the host) are the pieces every training worker runs
(:mod:`edsr_ray.training.loop`); ``benchmarks/bench_train.py`` times them.
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
