"""The one inference path: whole-image or seam-free tiled upscaling, ×8 self-ensemble, reduced precision with fallback.

Batch jobs, Serve, evaluation, training validation and the tests all upscale through :class:`Upscaler` (or the
functions :func:`upscale`, :func:`upscale_tensor` and :func:`upscale_decoded`, which build one per call), so a result
never depends on which entry point produced it.

Tiling. The LR image is cut into cores of at most ``tile`` pixels a side; each core is run together with the model's
receptive radius of real image around it (:func:`edsr_ray.models.receptive_radius`), and only the core's part of the
output is kept. Every output pixel therefore sees exactly the input it sees in a whole-image forward: inside the image
the context is real pixels, and at the true image border the patch border *is* the image border, where the convolutions
zero-pad exactly as they do on the whole image. Tiled and whole-image outputs agree up to float rounding (~1e-4),
unlike the official ``chop`` (quadrants, a 10-pixel shave) or hard-pasted tiles, which leave seams. All patches of an
image have one shape (a patch is shifted inwards at the image border rather than cut), so they batch together.

Precision. ``"auto"`` is fp32 on CPU and bf16 (fp16 where bf16 is unsupported) on CUDA; inputs are channels_last on
every device (the weights too on CUDA). Reduced precision runs a converted copy of the model, prepared once per
(model, device, dtype) and cached for the model's lifetime; a copy is rebuilt when the model's weights change
(training validation). Reduced precision is not used on CPU: a request for it there falls back to fp32 with a
warning. Any patch whose reduced-precision output holds a NaN or Inf is recomputed in fp32 and a warning is logged —
fp16 overflow gives black or NaN images in other upscalers.

Threads. An :class:`Upscaler` may be shared by the threads of one process (a Serve replica): preparing a model copy is
guarded by a lock and a forward pass only reads the weights. With ``compile=True`` run one warm-up call before
serving concurrently, so compilation happens once.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import logging
import math
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edsr_ray.codecs import DecodedImage
from edsr_ray.config import PRECISIONS, InferenceConfig
from edsr_ray.errors import ConfigError, EdsrRayError, ImageError
from edsr_ray.imaging import imresize
from edsr_ray.models import MeanShift, receptive_radius, unwrap_model

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_MIN_TILE = 8
# Share of the GPU memory that is free when an Upscaler first runs which its activations may use: leaves room for
# cuDNN workspaces, the allocator's fragmentation and other users of the card.
_CUDA_MEMORY_SHARE = 0.5
# On CPU: a quarter of physical memory, at most 4 GiB, so several workers on one node do not swap.
_CPU_MEMORY_CAP = 4 << 30
# LR pixels per forward pass on CPU when several patches or images could share one.
_CPU_BATCH_PIXELS = 1 << 16


# What a forward pass raises when an image does not fit in memory: that image's failure, not the whole run's.
OUT_OF_MEMORY_ERRORS = (MemoryError, torch.cuda.OutOfMemoryError)


class UpscaleCancelled(EdsrRayError):
    """The caller gave up on an upscale (see :func:`stop_when`); it stopped between two forward passes."""


_stop = threading.local()


@contextlib.contextmanager
def stop_when(check: Callable[[], bool]) -> Iterator[None]:
    """Inside this block, on this thread, an upscale raises :class:`UpscaleCancelled` before its next forward pass
    once ``check()`` is true: a service whose client timed out frees its compute instead of finishing the image."""
    previous = getattr(_stop, "check", None)
    _stop.check = check
    try:
        yield
    finally:
        _stop.check = previous


# --------------------------------------------------------------------------------------------------------------------
# Settings


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to compute on: CUDA when available and nothing is asked for, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device {device!r} is not a valid torch device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for, but CUDA is not available on this machine")
    return dev


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype for ``precision`` on ``device``.

    ``"auto"`` is fp32 on CPU and bf16 on CUDA (fp16 on GPUs without bf16). bf16/fp16 are GPU settings: on CPU they
    fall back to fp32 with a warning, because fp16 convolutions are slow or missing there and a CPU run is never
    memory-bound enough for bf16 to pay off reliably.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            message = f"precision {precision!r} is only used on CUDA; running in fp32 on {device}"
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        return torch.float32
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return _DTYPES[precision]


def model_scales(model: nn.Module) -> tuple[int, ...]:
    """The scales ``model`` upscales by (one for EDSR, several for MDSR)."""
    scales = tuple(int(s) for s in getattr(model, "scales", ()))
    if not scales:
        raise ConfigError(f"{type(model).__name__} does not list its scales (.scales); is it an EDSR/MDSR model?")
    return scales


def resolve_scale(model: nn.Module, scale: int | None) -> int:
    """Check ``scale`` against the model's scales; ``None`` picks the only one (an error for multi-scale MDSR)."""
    scales = model_scales(model)
    if scale is None:
        if len(scales) == 1:
            return scales[0]
        raise ConfigError(f"the model upscales by {list(scales)}: choose one with --scale / scale=")
    if int(scale) not in scales:
        if len(scales) == 1:
            raise ConfigError(f"scale {scale} does not match the model, which upscales by {scales[0]} only")
        raise ConfigError(f"scale {scale} is not one of the model's scales {list(scales)}")
    return int(scale)


# --------------------------------------------------------------------------------------------------------------------
# Prepared (moved, converted, compiled) copies of a model, cached for the model's lifetime


# Keyed weakly by the caller's model, so a copy lives exactly as long as the model it was made from; values never
# reference their key, so the cache cannot keep a model alive.
_PREPARED: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()
_PREPARED_LOCK = threading.Lock()


def _fingerprint(model: nn.Module) -> tuple:
    """Identity of the weights' current values: storage and in-place version of every tensor.

    The optimizer updates parameters in place, which bumps their version counters, so a copy prepared before a
    training step is detected as stale afterwards.
    """

    def version(t: torch.Tensor) -> int:
        try:
            return t._version
        except RuntimeError:  # inference tensors have no version counter and cannot be updated in place anyway
            return -1

    return tuple((t.data_ptr(), version(t)) for t in itertools.chain(model.parameters(), model.buffers()))


def _prepared(model: nn.Module, device: torch.device, dtype: torch.dtype, compile: bool) -> nn.Module:
    """The model on ``device`` in ``dtype`` (channels_last on CUDA, compiled if asked), made once and cached."""
    channels_last = device.type == "cuda"
    key = (str(device), dtype, compile)
    fingerprint = _fingerprint(model)
    with _PREPARED_LOCK:
        entries = _PREPARED.setdefault(model, {})
        hit = entries.get(key)
        if hit is not None and hit[0] == fingerprint:
            return model if hit[1] is None else hit[1]
        tensors = list(itertools.chain(model.parameters(), model.buffers()))
        if not channels_last and not compile and all(t.device == device and t.dtype == dtype for t in tensors):
            # Already what is needed (e.g. CPU fp32, training validation): use the model itself. The cache stores
            # None for it, since a value that referenced its own key would keep the model alive forever.
            entries[key] = (fingerprint, None)
            return model
        with torch.no_grad():
            module = copy.deepcopy(model).to(device=device, dtype=dtype)
            for m in module.modules():
                # The fixed mean shifts compute in float32 by design (adding the mean back in bf16 would round the
                # output to whole grey levels above 128), so their parameters stay float32.
                if isinstance(m, MeanShift):
                    m.float()
            if channels_last:
                module = module.to(memory_format=torch.channels_last)
        module.eval().requires_grad_(False)
        if compile:
            # Shapes are fixed per tile plan, so static shapes; a new image size recompiles once.
            module = torch.compile(module, dynamic=False)
        entries[key] = (fingerprint, module)
        return module


# --------------------------------------------------------------------------------------------------------------------
# Tile plans


@dataclass(frozen=True)
class _Axis:
    """How one image axis is cut: ``(core_start, core_end, patch_start)`` per core, and the common patch length."""

    cores: tuple[tuple[int, int, int], ...]
    patch: int


def _split_axis(length: int, tile: int, radius: int) -> _Axis:
    """Cut ``length`` into cores of at most ``tile`` (balanced), each inside a patch with ``radius`` of context.

    A patch starts ``radius`` before its core, shifted inwards where that would leave the image, so all patches have
    one length and always contain the core plus ``radius`` of real image on each side, or the image border.
    """
    if length <= tile:
        return _Axis(((0, length, 0),), length)
    n = math.ceil(length / tile)
    core = math.ceil(length / n)  # balanced: no sliver of a last core
    patch = min(core + 2 * radius, length)
    cores = []
    for start in range(0, length, core):
        end = min(start + core, length)
        cores.append((start, end, min(max(start - radius, 0), length - patch)))
    return _Axis(tuple(cores), patch)


@dataclass(frozen=True)
class _Plan:
    rows: _Axis
    cols: _Axis
    batch: int  # patches per forward (before the ensemble's ×4 per group)


# --------------------------------------------------------------------------------------------------------------------
# The upscaler


class Upscaler:
    """A loaded model plus inference settings; call it on images. Shared by batch jobs, Serve and evaluation.

    Args:
        model: an EDSR/MDSR model (anything with ``.config``, ``.scales`` and ``forward(x, scale)``).
        tile: LR core side for tiled inference; ``None`` runs whole images when they fit the memory budget and picks
            tiles automatically when they do not.
        self_ensemble: average the 8 flips/transposes (EDSR+ / MDSR+); 8× the compute.
        precision: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"`` (see :func:`resolve_precision`).
        device: where to compute; ``None`` is CUDA when available, else CPU.
        tile_batch: patches per forward pass; ``None`` fills the memory budget.
        compile: run a ``torch.compile``-d copy (pays off on GPUs for repeated input shapes, e.g. tiles).
        memory_budget: bytes of activations one forward may use; ``None`` is half the free GPU memory, or a quarter
            of the RAM (at most 4 GiB) on CPU.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        tile: int | None = None,
        self_ensemble: bool = False,
        precision: str = "auto",
        device: str | torch.device | None = None,
        tile_batch: int | None = None,
        compile: bool = False,
        memory_budget: int | None = None,
    ):
        if tile is not None and int(tile) < _MIN_TILE:
            raise ConfigError(f"tile must be >= {_MIN_TILE} or None, got {tile}")
        if tile_batch is not None and int(tile_batch) < 1:
            raise ConfigError(f"tile_batch must be >= 1 or None, got {tile_batch}")
        if memory_budget is not None and int(memory_budget) < 1:
            raise ConfigError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
        if getattr(unwrap_model(model), "config", None) is None:
            raise ConfigError(f"{type(model).__name__} has no .config; build it with edsr_ray.models")
        self.model = unwrap_model(model)  # DDP / torch.compile wrappers: run (and copy) the network inside
        config = self.model.config
        if config.n_colors != 3:
            raise ConfigError(
                f"the model works on {config.n_colors} colour channel(s); images are upscaled by RGB models "
                "(n_colors=3)"
            )
        # Images are in [0, 255]; a network trained in [0, rgb_range] (some forks use 1) gets them rescaled.
        self._range = float(config.rgb_range) / 255.0
        self.tile = None if tile is None else int(tile)
        self.self_ensemble = bool(self_ensemble)
        self.precision = precision
        self.device = resolve_device(device)
        self.dtype = resolve_precision(precision, self.device)
        self.tile_batch = None if tile_batch is None else int(tile_batch)
        self.compile = bool(compile)
        self._memory_budget = None if memory_budget is None else int(memory_budget)
        self._radius: int | None = None

    @classmethod
    def from_config(cls, model: nn.Module, cfg: InferenceConfig, *, device: str | torch.device | None = None):
        """An upscaler with the settings of an :class:`~edsr_ray.config.InferenceConfig` section."""
        return cls(model, tile=cfg.tile, self_ensemble=cfg.self_ensemble, precision=cfg.precision, device=device)

    def __repr__(self) -> str:
        return (
            f"Upscaler({type(self.model).__name__}, scales={list(self.model.scales)}, tile={self.tile}, "
            f"self_ensemble={self.self_ensemble}, dtype={self.dtype}, device={self.device})"
        )

    # ---- public entry points ---------------------------------------------------------------------------------------

    def __call__(
        self, image: np.ndarray | DecodedImage | torch.Tensor, scale: int | None = None
    ) -> np.ndarray | DecodedImage | torch.Tensor:
        """Upscale a uint8 (H, W, 3) array, a :class:`~edsr_ray.codecs.DecodedImage` or a float (B, 3, H, W)
        tensor; the result is of the same kind (see :meth:`upscale`, :meth:`upscale_decoded`, :meth:`upscale_tensor`).
        """
        if isinstance(image, np.ndarray):
            return self.upscale(image, scale)
        if isinstance(image, torch.Tensor):
            return self.upscale_tensor(image, scale)
        if isinstance(image, DecodedImage):
            return self.upscale_decoded(image, scale)
        raise ImageError(f"cannot upscale a {type(image).__name__}: expected an array, a DecodedImage or a tensor")

    def upscale(self, image: np.ndarray, scale: int | None = None) -> np.ndarray:
        """uint8 (H, W, 3) RGB → uint8 (H*s, W*s, 3), rounded and clipped like the paper's evaluation."""
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ImageError(f"upscale expects a uint8 (H, W, 3) RGB array, got {_describe(image)}")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ImageError(f"cannot upscale an empty image of shape {image.shape}")
        scale = resolve_scale(self.model, scale)
        x = _as_tensor(image).permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W) uint8 view
        h, w = image.shape[:2]
        out = torch.empty((1, h * scale, w * scale, 3), dtype=torch.uint8)  # (1, H*s, W*s, 3), HWC like numpy

        def quantize(y: torch.Tensor) -> torch.Tensor:  # (N, 3, h*s, w*s) float → (N, h*s, w*s, 3) uint8 on CPU
            # Quantised on the device: a quarter of the bytes to copy back.
            return y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()

        self._run(x, scale, out, quantize, channels_last_out=True)
        return out[0].numpy()

    def upscale_batch(self, images: np.ndarray, scale: int | None = None) -> np.ndarray:
        """uint8 (B, H, W, 3) same-size images → uint8 (B, H*s, W*s, 3), equal to :meth:`upscale` on each image.

        Several images share forward passes where the memory budget allows (large ones are still tiled); the output
        is quantised on the device, so only uint8 crosses back (a quarter of the float32 bytes).
        """
        if len(images) == 1:
            return self.upscale(images[0], scale)[None]
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)  # (B, H, W, 3) uint8
        y = self.upscale_tensor(x.permute(0, 3, 1, 2).float(), scale)  # (B, 3, H*s, W*s) float32 on the device
        return y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (B, H*s, W*s, 3)

    def upscale_tensor(self, x: torch.Tensor, scale: int | None = None) -> torch.Tensor:
        """Float (B, 3, H, W) in [0, 255] → float32 (B, 3, H*s, W*s) on ``x``'s device, not quantised."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
            raise ImageError(f"upscale_tensor expects a (B, 3, H, W) tensor, got {_describe(x)}")
        if not x.is_floating_point():
            raise ImageError(f"upscale_tensor expects a float tensor in [0, 255], got dtype {x.dtype}")
        scale = resolve_scale(self.model, scale)
        b, _, h, w = x.shape
        out = torch.empty((b, 3, h * scale, w * scale), dtype=torch.float32, device=x.device)
        self._run(x, scale, out, lambda y: y.to(out.device), channels_last_out=False)
        return out

    def upscale_decoded(self, img: DecodedImage, scale: int | None = None) -> DecodedImage:
        """Upscale a decoded image keeping what it is: grey stays grey, alpha is kept, 16-bit stays 16-bit.

        The model sees 3-channel RGB in [0, 255]: a 16-bit image is divided by 257 and the float output multiplied
        back, so it keeps its extra precision. A grey source gets the mean of the three output channels (computed in
        float, then rounded) in all three. Alpha is not a colour: it is resized with bicubic ``imresize``.
        """
        rgb = img.rgb
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype not in (np.uint8, np.uint16):
            raise ImageError(f"DecodedImage.rgb must be (H, W, 3) uint8 or uint16, got {_describe(rgb)}")
        scale = resolve_scale(self.model, scale)
        if rgb.dtype == np.uint8 and not img.grey:
            out_rgb = self.upscale(rgb, scale)
        else:
            peak = 65535 if rgb.dtype == np.uint16 else 255
            x = _as_tensor(rgb).permute(2, 0, 1).unsqueeze(0).float()  # (1, 3, H, W)
            if peak == 65535:
                x /= 257.0  # 65535 / 257 = 255: the model's range
            y = self.upscale_tensor(x, scale)[0]  # (3, H*s, W*s) float in [0, 255]
            if img.grey:
                y = y.mean(dim=0, keepdim=True).repeat(3, 1, 1)
            if peak == 65535:
                y = y * 257.0
            out_rgb = y.round_().clamp_(0, peak).permute(1, 2, 0).numpy().astype(rgb.dtype)  # (H*s, W*s, 3)
        alpha = None if img.alpha is None else imresize(img.alpha, scale)  # same dtype, rounded and clipped
        return dataclasses.replace(img, rgb=out_rgb, alpha=alpha)

    # ---- machinery -------------------------------------------------------------------------------------------------

    def memory_budget(self) -> int:
        """Bytes of activations one forward pass may use (measured once, on first use)."""
        if self._memory_budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                self._memory_budget = int(free * _CUDA_MEMORY_SHARE)
            else:
                phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                self._memory_budget = int(min(phys // 4, _CPU_MEMORY_CAP))
        return self._memory_budget

    def receptive_radius(self) -> int:
        """Context (LR pixels) each core needs on every side for tiles to equal the whole-image forward."""
        if self._radius is None:
            self._radius = int(receptive_radius(self.model))
        return self._radius

    def _bytes_per_pixel(self, scale: int) -> int:
        """Peak bytes per LR input pixel of one forward item.

        The largest activations sit in the upsampler: at ×4 the last conv maps F features at 2× to 4F features at 2×
        (16·F per LR pixel) while its input (4·F) is alive; the body holds about four F-channel maps. Add the float32
        output and its quantised copy.
        """
        n_feats = int(self.model.config.n_feats)
        elem = torch.finfo(self.dtype).bits // 8
        return elem * n_feats * (scale * scale + 4) + 3 * scale * scale * (4 + 4 + 1)

    def plan(self, height: int, width: int, batch: int, scale: int) -> _Plan:
        """How a batch of ``batch`` images of ``height`` x ``width`` is cut into patches and forward batches."""
        max_pixels = max(1, self.memory_budget() // self._bytes_per_pixel(scale))  # LR pixels per forward
        tile = self.tile
        if tile is None and height * width > max_pixels:
            # Too large for one pass: square patches as large as the budget allows (context is overhead, so prefer
            # few large patches to many small ones).
            tile = max(math.isqrt(max_pixels) - 2 * self.receptive_radius(), _MIN_TILE)
        if tile is None or (height <= tile and width <= tile):
            rows, cols = _Axis(((0, height, 0),), height), _Axis(((0, width, 0),), width)
        else:
            radius = self.receptive_radius()
            rows, cols = _split_axis(height, tile, radius), _split_axis(width, tile, radius)
        if self.device.type != "cuda":
            # Batching buys nothing on CPU once a forward is this large, while a smaller working set stays in cache
            # and makes the allocator fault in fewer fresh pages; small images and tiles are still batched.
            max_pixels = min(max_pixels, _CPU_BATCH_PIXELS)
        per_batch = self.tile_batch or max(1, max_pixels // (rows.patch * cols.patch))
        n_patches = batch * len(rows.cores) * len(cols.cores)
        return _Plan(rows, cols, min(per_batch, n_patches))

    def _run(
        self,
        x: torch.Tensor,
        scale: int,
        out: torch.Tensor,
        convert: Callable[[torch.Tensor], torch.Tensor],
        *,
        channels_last_out: bool,
    ) -> None:
        """Upscale ``x`` (B, 3, H, W) patch batch by patch batch, pasting each core into the preallocated ``out``.

        ``convert`` maps a float output batch (N, 3, h*s, w*s) to ``out``'s dtype, device and layout; with
        ``channels_last_out`` it returns (N, h*s, w*s, 3) and ``out`` is (B, H*s, W*s, 3).
        """
        b, _, h, w = x.shape
        plan = self.plan(h, w, b, scale)
        fast = _prepared(self.model, self.device, self.dtype, self.compile)
        forward = self._ensemble if self.self_ensemble else self._forward
        ph, pw = plan.rows.patch, plan.cols.patch
        jobs = [(i, r, c) for i in range(b) for r in plan.rows.cores for c in plan.cols.cores]
        with torch.inference_mode():
            for start in range(0, len(jobs), plan.batch):
                check = getattr(_stop, "check", None)
                if check is not None and check():
                    raise UpscaleCancelled(f"upscale stopped after {start} of {len(jobs)} patches: the caller gave up")
                chunk = jobs[start : start + plan.batch]
                patches = torch.stack([x[i, :, r[2] : r[2] + ph, c[2] : c[2] + pw] for i, r, c in chunk])
                # Move the small (often uint8) patches first and convert on the device: less host-to-device traffic.
                patches = patches.to(self.device).float()  # (N, 3, ph, pw)
                y = convert(forward(fast, patches, scale, plan.batch))  # (N, 3, ph*s, pw*s) or (N, ph*s, pw*s, 3)
                for k, (i, (r0, r1, rp), (c0, c1, cp)) in enumerate(chunk):
                    src_r = slice((r0 - rp) * scale, (r1 - rp) * scale)
                    src_c = slice((c0 - cp) * scale, (c1 - cp) * scale)
                    dst_r, dst_c = slice(r0 * scale, r1 * scale), slice(c0 * scale, c1 * scale)
                    if channels_last_out:
                        out[i, dst_r, dst_c, :] = y[k, src_r, src_c, :]
                    else:
                        out[i, :, dst_r, dst_c] = y[k, :, src_r, src_c]

    def _forward(self, module: nn.Module, x: torch.Tensor, scale: int, max_batch: int) -> torch.Tensor:
        """Model forward on float32 patches (N, 3, h, w) → float32 (N, 3, h*s, w*s), in chunks of ``max_batch``.

        In reduced precision, patches whose output is not finite are recomputed in fp32 (logged as a warning).
        """
        outs = []
        for xc in x.split(max_batch):
            if self._range != 1.0:
                xc = xc * self._range
            y = _call(module, xc, scale, self.dtype)
            if self.dtype != torch.float32:
                bad = ~torch.isfinite(y).flatten(1).all(dim=1)  # (N,)
                if bool(bad.any()):
                    n_bad = int(bad.sum())
                    logger.warning(
                        "%s output had NaN/Inf in %d of %d patch(es) of shape %s at x%d; recomputed them in fp32",
                        str(self.dtype).removeprefix("torch."),
                        n_bad,
                        len(xc),
                        tuple(xc.shape[-2:]),
                        scale,
                    )
                    fp32 = _prepared(self.model, self.device, torch.float32, False)
                    y[bad] = _call(fp32, xc[bad], scale, torch.float32)
            outs.append(y if self._range == 1.0 else y / self._range)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _ensemble(self, module: nn.Module, x: torch.Tensor, scale: int, max_batch: int) -> torch.Tensor:
        """×8 self-ensemble of patches (N, 3, h, w): forward every flip/transpose, undo it, average in float32.

        The 4 flips of a patch share a shape and run as one batch; the 4 transposed ones (w, h) as another. Patches
        carry their full context on all sides, so ensembling per patch equals ensembling the whole image.
        """
        n = x.shape[0]
        total = None
        for transpose in (False, True):
            xt = x.transpose(-1, -2) if transpose else x
            variants = torch.cat([xt, xt.flip(-1), xt.flip(-2), xt.flip(-2, -1)])  # (4N, 3, h', w')
            y0, y1, y2, y3 = self._forward(module, variants, scale, max_batch).split(n)
            part = y0 + y1.flip(-1) + y2.flip(-2) + y3.flip(-2, -1)  # undo each flip, (N, 3, h'*s, w'*s)
            if transpose:
                part = part.transpose(-1, -2)
            total = part if total is None else total + part
        return total / 8


def _call(module: nn.Module, x: torch.Tensor, scale: int, dtype: torch.dtype) -> torch.Tensor:
    """One forward: float32 (N, 3, h, w) → float32 (N, 3, h*s, w*s), input cast to the module's dtype and layout."""
    # channels_last (NHWC) input on every device: cuDNN and PyTorch's CPU convolutions (oneDNN) both run faster on it
    # than on NCHW; on CPU it brings PyTorch close to ONNX Runtime (benchmarks/RESULTS.md, bench_onnx.py).
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    return module(x, scale).float()


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor view of ``array`` (no copy when contiguous), read-only arrays included: it is only ever read."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(array))


def _describe(value: object) -> str:
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return f"{type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__


# --------------------------------------------------------------------------------------------------------------------
# Functional API


def upscale(
    model: nn.Module,
    image: np.ndarray,
    scale: int | None,
    *,
    tile: int | None = None,
    self_ensemble: bool = False,
    precision: str = "auto",
    device: str | torch.device | None = None,
    tile_batch: int | None = None,
) -> np.ndarray:
    """uint8 (H, W, 3) RGB → uint8 (H*s, W*s, 3). See :class:`Upscaler` for the settings."""
    up = Upscaler(
        model, tile=tile, self_ensemble=self_ensemble, precision=precision, device=device, tile_batch=tile_batch
    )
    return up.upscale(image, scale)


def upscale_tensor(
    model: nn.Module,
    x: torch.Tensor,
    scale: int | None,
    *,
    tile: int | None = None,
    self_ensemble: bool = False,
    precision: str = "auto",
    device: str | torch.device | None = None,
    tile_batch: int | None = None,
) -> torch.Tensor:
    """Float (B, 3, H, W) in [0, 255] → float32 (B, 3, H*s, W*s), not quantised (training validation, 16-bit)."""
    up = Upscaler(
        model, tile=tile, self_ensemble=self_ensemble, precision=precision, device=device, tile_batch=tile_batch
    )
    return up.upscale_tensor(x, scale)


def upscale_decoded(
    model: nn.Module,
    img: DecodedImage,
    scale: int | None,
    *,
    tile: int | None = None,
    self_ensemble: bool = False,
    precision: str = "auto",
    device: str | torch.device | None = None,
    tile_batch: int | None = None,
) -> DecodedImage:
    """Upscale a decoded image; grey, alpha and 16-bit are kept (see :meth:`Upscaler.upscale_decoded`)."""
    up = Upscaler(
        model, tile=tile, self_ensemble=self_ensemble, precision=precision, device=device, tile_batch=tile_batch
    )
    return up.upscale_decoded(img, scale)
