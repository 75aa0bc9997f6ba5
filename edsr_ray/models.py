"""EDSR and MDSR networks whose state dicts match the official release (torch and the model config, nothing else).

The modules here produce exactly the parameter names and shapes of the official EDSR-PyTorch code, so the released
``.pt`` files (bare state dicts) load with ``strict=True`` (reading weight files is :mod:`edsr_ray.weights`). Inputs and
outputs are float tensors in ``[0, rgb_range]``.

MDSR branch numbering: ``pre_process.{i}`` and ``upsample.{i}`` belong to ``scales[i]``. With the default scales
``(2, 3, 4)`` this is the official layout (0/1/2 = x2/x3/x4); a model built for a subset such as ``(2, 4)`` numbers its
branches 0/1 in that order.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edsr_ray.config import ModelConfig, from_dict

# Mean RGB of the DIV2K training set (official code); the network works on mean-free inputs.
DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)


# Extra LR pixels added to the exact receptive radius, so tile overlaps never sit on the boundary.
RECEPTIVE_MARGIN = 1


def _conv(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Conv2d:
    # "same" padding, with bias: the official default_conv.
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=True)


def channel_mean(n_colors: int) -> tuple[float, ...]:
    """The per-channel mean the network subtracts (in [0, 1]); greyscale models (not in the official release) use the
    average of the RGB means."""
    return DIV2K_RGB_MEAN if n_colors == 3 else (sum(DIV2K_RGB_MEAN) / 3,)


class MeanShift(nn.Module):
    """Fixed 1x1 convolution that subtracts (``sign=-1``) or adds (``sign=+1``) the DIV2K mean times ``rgb_range``.

    Kept as a convolution with frozen parameters (``requires_grad=False``) only so that its ``weight`` and ``bias``
    appear in the state dict exactly as in the released files. It always computes in float32, outside autocast: the
    input mean shift returns the input's dtype, while the output mean shift returns at least float32, so that adding
    the mean back to a bf16/fp16 network output is not rounded to the reduced precision (bf16 steps are a whole
    grey level above 128).
    """

    def __init__(self, rgb_range: float, sign: int, n_colors: int = 3):
        super().__init__()
        if sign not in (-1, 1):
            raise ValueError(f"sign must be -1 or +1, got {sign}")
        self.sign = sign
        mean = torch.tensor(channel_mean(n_colors), dtype=torch.float32)
        # std is 1 for DIV2K in the official code, so the weight is the identity.
        self.weight = nn.Parameter(torch.eye(n_colors).view(n_colors, n_colors, 1, 1), requires_grad=False)
        self.bias = nn.Parameter(sign * rgb_range * mean, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            y = F.conv2d(x.float(), self.weight.float(), self.bias.float())  # (B, C, H, W)
        return y.to(x.dtype) if self.sign < 0 else y.to(torch.promote_types(x.dtype, torch.float32))


class ResBlock(nn.Module):
    """conv -> ReLU -> conv, scaled by ``res_scale`` and added to the input (no batch norm)."""

    def __init__(self, n_feats: int, kernel_size: int = 3, res_scale: float = 1.0):
        super().__init__()
        self.res_scale = res_scale
        self.body = nn.Sequential(
            _conv(n_feats, n_feats, kernel_size), nn.ReLU(inplace=True), _conv(n_feats, n_feats, kernel_size)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self.body(x)  # (B, F, H, W)
        if self.res_scale != 1.0:
            # Residual scaling keeps the 256-feature paper model stable in training.
            res = res * self.res_scale
        return x + res


class Upsampler(nn.Sequential):
    """Sub-pixel upsampling: x2/x4 are one/two conv(F -> 4F) + PixelShuffle(2); x3 is conv(F -> 9F) + PixelShuffle(3).

    Indices (0: conv, 1: shuffle, 2: conv, 3: shuffle) match the official ``tail.0.{0,2}`` and ``upsample.{i}.{0,2}``
    keys.
    """

    def __init__(self, scale: int, n_feats: int):
        if scale == 3:
            layers: list[nn.Module] = [_conv(n_feats, 9 * n_feats), nn.PixelShuffle(3)]
        elif scale in (2, 4):
            layers = []
            for _ in range(int(math.log2(scale))):
                layers += [_conv(n_feats, 4 * n_feats), nn.PixelShuffle(2)]
        else:
            raise ValueError(f"unsupported upsampling scale {scale}; choose 2, 3 or 4")
        super().__init__(*layers)


def _model_config(what: str, **values: Any) -> ModelConfig:
    # Validates constructor arguments with the config's own checks; errors name the constructor.
    return from_dict(ModelConfig, values, source=what)


def _check_input(x: torch.Tensor, n_colors: int, name: str) -> None:
    if x.dim() != 4 or x.shape[1] != n_colors:
        raise ValueError(f"{name} expects a (B, {n_colors}, H, W) tensor, got shape {tuple(x.shape)}")


class EDSR(nn.Module):
    """Enhanced Deep Super-Resolution network for one scale (Lim et al., 2017).

    ``sub_mean`` -> ``head`` conv -> ``body`` (R ResBlocks + conv, skip from the head) -> ``tail`` (upsampler + conv)
    -> ``add_mean``. Input (B, C, H, W) in [0, rgb_range]; output (B, C, H*s, W*s).
    """

    def __init__(
        self,
        n_resblocks: int,
        n_feats: int,
        scale: int,
        res_scale: float = 1.0,
        n_colors: int = 3,
        rgb_range: int = 255,
    ):
        super().__init__()
        cfg = _model_config(
            "EDSR(...)",
            arch="edsr",
            n_resblocks=n_resblocks,
            n_feats=n_feats,
            scales=(scale,),
            res_scale=res_scale,
            n_colors=n_colors,
            rgb_range=rgb_range,
        )
        self.config = cfg
        self.scales = cfg.scales
        self.scale = cfg.scale
        # Registration order follows the official module, so state_dict() lists keys in the released order.
        self.sub_mean = MeanShift(cfg.rgb_range, -1, cfg.n_colors)
        self.add_mean = MeanShift(cfg.rgb_range, +1, cfg.n_colors)
        self.head = nn.Sequential(_conv(cfg.n_colors, cfg.n_feats))
        self.body = nn.Sequential(
            *[ResBlock(cfg.n_feats, 3, cfg.res_scale) for _ in range(cfg.n_resblocks)],
            _conv(cfg.n_feats, cfg.n_feats),
        )
        self.tail = nn.Sequential(Upsampler(cfg.scale, cfg.n_feats), _conv(cfg.n_feats, cfg.n_colors))

    def forward(self, x: torch.Tensor, scale: int | None = None) -> torch.Tensor:
        """Upscale ``x`` (B, C, H, W) by the model's scale; ``scale``, if given, must equal it."""
        if scale is not None and scale != self.scale:
            raise ValueError(f"this EDSR model upscales x{self.scale} only, got scale={scale!r}")
        _check_input(x, self.config.n_colors, "EDSR")
        x = self.sub_mean(x)  # (B, C, H, W), mean-free
        x = self.head(x)  # (B, F, H, W)
        x = x + self.body(x)  # (B, F, H, W), global skip around the body
        x = self.tail(x)  # (B, C, H*s, W*s)
        return self.add_mean(x)


class MDSR(nn.Module):
    """Multi-scale network: shared head and body, a per-scale pre-process (two 5x5 ResBlocks) and upsampler.

    ``forward(x, scale)`` takes the scale explicitly; branch ``i`` serves ``scales[i]``. ``res_scale`` applies to the
    shared body; the 5x5 pre-process blocks are never scaled (as in the official code).
    """

    def __init__(
        self,
        n_resblocks: int,
        n_feats: int = 64,
        scales: tuple[int, ...] = (2, 3, 4),
        res_scale: float = 1.0,
        n_colors: int = 3,
        rgb_range: int = 255,
    ):
        super().__init__()
        cfg = _model_config(
            "MDSR(...)",
            arch="mdsr",
            n_resblocks=n_resblocks,
            n_feats=n_feats,
            scales=tuple(scales),
            res_scale=res_scale,
            n_colors=n_colors,
            rgb_range=rgb_range,
        )
        self.config = cfg
        self.scales = cfg.scales
        nf = cfg.n_feats
        self.sub_mean = MeanShift(cfg.rgb_range, -1, cfg.n_colors)
        self.add_mean = MeanShift(cfg.rgb_range, +1, cfg.n_colors)
        self.head = nn.Sequential(_conv(cfg.n_colors, nf))
        self.pre_process = nn.ModuleList(nn.Sequential(ResBlock(nf, 5), ResBlock(nf, 5)) for _ in cfg.scales)
        self.body = nn.Sequential(*[ResBlock(nf, 3, cfg.res_scale) for _ in range(cfg.n_resblocks)], _conv(nf, nf))
        self.upsample = nn.ModuleList(Upsampler(s, nf) for s in cfg.scales)
        self.tail = nn.Sequential(_conv(nf, cfg.n_colors))

    def forward(self, x: torch.Tensor, scale: int) -> torch.Tensor:
        """Upscale ``x`` (B, C, H, W) by ``scale``, one of ``self.scales``."""
        if scale not in self.scales:
            raise ValueError(f"this MDSR model supports scales {list(self.scales)}, got scale={scale!r}")
        i = self.scales.index(scale)
        _check_input(x, self.config.n_colors, "MDSR")
        x = self.sub_mean(x)  # (B, C, H, W)
        x = self.head(x)  # (B, F, H, W)
        x = self.pre_process[i](x)  # (B, F, H, W)
        x = x + self.body(x)  # (B, F, H, W)
        x = self.upsample[i](x)  # (B, F, H*s, W*s)
        x = self.tail(x)  # (B, C, H*s, W*s)
        return self.add_mean(x)


def build_model(cfg: ModelConfig) -> EDSR | MDSR:
    """A freshly initialised network for ``cfg``."""
    kwargs = {"res_scale": cfg.res_scale, "n_colors": cfg.n_colors, "rgb_range": cfg.rgb_range}
    if cfg.arch == "edsr":
        return EDSR(cfg.n_resblocks, cfg.n_feats, cfg.scale, **kwargs)
    return MDSR(cfg.n_resblocks, cfg.n_feats, cfg.scales, **kwargs)


def edsr_baseline(scale: int) -> EDSR:
    """Baseline EDSR: 16 blocks, 64 features, res_scale 1 (1.37/1.55/1.52 M parameters for x2/x3/x4)."""
    return EDSR(16, 64, scale, res_scale=1.0)


def edsr_paper(scale: int) -> EDSR:
    """The paper's EDSR: 32 blocks, 256 features, res_scale 0.1 (40.7/43.7/43.1 M parameters)."""
    return EDSR(32, 256, scale, res_scale=0.1)


def mdsr_baseline() -> MDSR:
    """Baseline MDSR: 16 shared blocks, 64 features, x2/x3/x4 (3.2 M parameters)."""
    return MDSR(16, 64, (2, 3, 4))


def mdsr_paper() -> MDSR:
    """The paper's MDSR: 80 shared blocks, 64 features, x2/x3/x4 (8.0 M parameters)."""
    return MDSR(80, 64, (2, 3, 4))


# The officially released files, by their names, and the architectures they hold.
VARIANTS: dict[str, ModelConfig] = {
    **{f"edsr_baseline_x{s}": ModelConfig("edsr", 16, 64, (s,), 1.0) for s in (2, 3, 4)},
    **{f"edsr_x{s}": ModelConfig("edsr", 32, 256, (s,), 0.1) for s in (2, 3, 4)},
    "mdsr_baseline": ModelConfig("mdsr", 16, 64, (2, 3, 4), 1.0),
    "mdsr": ModelConfig("mdsr", 80, 64, (2, 3, 4), 1.0),
}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network inside DistributedDataParallel / DataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def config_of(model: nn.Module) -> ModelConfig:
    """The :class:`~edsr_ray.config.ModelConfig` a network was built with (inside any DDP or compile wrapper)."""
    cfg = getattr(unwrap_model(model), "config", None)
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"{type(model).__name__} has no ModelConfig in .config; build it with edsr_ray.models")
    return cfg


def receptive_radius(model_or_config: nn.Module | ModelConfig) -> int:
    """Radius, in LR pixels, of the input region that can influence an output pixel, plus a safety margin.

    An HR output pixel ``y`` is computed from LR pixels within this distance of ``y // s``. Every 3x3 conv at LR
    resolution adds 1 (head, 2 per ResBlock, the body's final conv, the first upsampling conv), every 5x5 conv of the
    MDSR pre-process adds 2, and the convs that run after a pixel shuffle add 1/2 (second x4 conv) and 1/s (final
    conv) of an LR pixel, rounded up together. Tiles that overlap their neighbours by at least this many LR pixels
    (and are cropped by it) give exactly the untiled output, because zero padding at a tile edge never reaches the
    kept region.
    """
    cfg = model_or_config if isinstance(model_or_config, ModelConfig) else config_of(model_or_config)
    lr = 1 + 2 * cfg.n_resblocks + 1 + 1  # head, body ResBlocks, body conv, first upsampling conv
    if cfg.arch == "mdsr":
        lr += 2 * 2 * 2  # two 5x5 ResBlocks = four convs of half-width 2
    after_shuffle = max((0.5 if s == 4 else 0.0) + 1.0 / s for s in cfg.scales)
    return lr + math.ceil(after_shuffle) + RECEPTIVE_MARGIN


__all__ = [
    "DIV2K_RGB_MEAN",
    "EDSR",
    "MDSR",
    "RECEPTIVE_MARGIN",
    "VARIANTS",
    "MeanShift",
    "ResBlock",
    "Upsampler",
    "build_model",
    "channel_mean",
    "config_of",
    "edsr_baseline",
    "edsr_paper",
    "mdsr_baseline",
    "mdsr_paper",
    "receptive_radius",
    "unwrap_model",
]
