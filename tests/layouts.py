"""The official EDSR/MDSR state-dict layouts written out from the reference (REFERENCE-edsr.md), random tensors in
them, and a plain functional forward over those tensors: independent of edsr_ray.models, for the tests of the networks
and of the weight files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edsr_ray import models

MEAN = (0.4488, 0.4371, 0.4040)  # DIV2K RGB mean from the paper's code


TINY_R, TINY_F = 2, 8


def edsr_layout(n_resblocks: int, n_feats: int, scale: int, n_colors: int = 3) -> dict[str, tuple[int, ...]]:
    c, f = n_colors, n_feats
    shapes: dict[str, tuple[int, ...]] = {
        "sub_mean.weight": (c, c, 1, 1),
        "sub_mean.bias": (c,),
        "add_mean.weight": (c, c, 1, 1),
        "add_mean.bias": (c,),
        "head.0.weight": (f, c, 3, 3),
        "head.0.bias": (f,),
    }
    for i in range(n_resblocks):
        for j in (0, 2):
            shapes[f"body.{i}.body.{j}.weight"] = (f, f, 3, 3)
            shapes[f"body.{i}.body.{j}.bias"] = (f,)
    shapes[f"body.{n_resblocks}.weight"] = (f, f, 3, 3)
    shapes[f"body.{n_resblocks}.bias"] = (f,)
    up = 9 * f if scale == 3 else 4 * f
    shapes["tail.0.0.weight"] = (up, f, 3, 3)
    shapes["tail.0.0.bias"] = (up,)
    if scale == 4:
        shapes["tail.0.2.weight"] = (4 * f, f, 3, 3)
        shapes["tail.0.2.bias"] = (4 * f,)
    shapes["tail.1.weight"] = (c, f, 3, 3)
    shapes["tail.1.bias"] = (c,)
    return shapes


def mdsr_layout(
    n_resblocks: int, n_feats: int = 64, scales: tuple[int, ...] = (2, 3, 4), n_colors: int = 3
) -> dict[str, tuple[int, ...]]:
    c, f = n_colors, n_feats
    shapes: dict[str, tuple[int, ...]] = {
        "sub_mean.weight": (c, c, 1, 1),
        "sub_mean.bias": (c,),
        "add_mean.weight": (c, c, 1, 1),
        "add_mean.bias": (c,),
        "head.0.weight": (f, c, 3, 3),
        "head.0.bias": (f,),
    }
    for s in range(len(scales)):
        for block in (0, 1):
            for j in (0, 2):
                shapes[f"pre_process.{s}.{block}.body.{j}.weight"] = (f, f, 5, 5)
                shapes[f"pre_process.{s}.{block}.body.{j}.bias"] = (f,)
    for i in range(n_resblocks):
        for j in (0, 2):
            shapes[f"body.{i}.body.{j}.weight"] = (f, f, 3, 3)
            shapes[f"body.{i}.body.{j}.bias"] = (f,)
    shapes[f"body.{n_resblocks}.weight"] = (f, f, 3, 3)
    shapes[f"body.{n_resblocks}.bias"] = (f,)
    for s, scale in enumerate(scales):
        up = 9 * f if scale == 3 else 4 * f
        shapes[f"upsample.{s}.0.weight"] = (up, f, 3, 3)
        shapes[f"upsample.{s}.0.bias"] = (up,)
        if scale == 4:
            shapes[f"upsample.{s}.2.weight"] = (4 * f, f, 3, 3)
            shapes[f"upsample.{s}.2.bias"] = (4 * f,)
    shapes["tail.0.weight"] = (c, f, 3, 3)
    shapes["tail.0.bias"] = (c,)
    return shapes


def random_state_dict(
    layout: dict[str, tuple[int, ...]], *, rgb_range: float = 255, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random weights scaled to keep activations moderate; mean shifts as in the official files."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in layout.items():
        if key.startswith(("sub_mean.", "add_mean.")):
            continue
        if key.endswith(".weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            sd[key] = torch.randn(shape, generator=g) * (0.5 / fan_in**0.5)
        else:
            sd[key] = torch.randn(shape, generator=g) * 0.01
    c = layout["sub_mean.bias"][0]
    mean = torch.tensor(MEAN if c == 3 else (sum(MEAN) / 3,))
    eye = torch.eye(c).view(c, c, 1, 1)
    sd["sub_mean.weight"], sd["sub_mean.bias"] = eye.clone(), -rgb_range * mean
    sd["add_mean.weight"], sd["add_mean.bias"] = eye.clone(), rgb_range * mean
    return sd


# An independent functional forward from the same tensors


def _conv(x: torch.Tensor, sd: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    w = sd[f"{key}.weight"]
    return F.conv2d(x, w, sd[f"{key}.bias"], padding=w.shape[-1] // 2)


def _resblock(x: torch.Tensor, sd: dict[str, torch.Tensor], key: str, res_scale: float) -> torch.Tensor:
    return x + res_scale * _conv(F.relu(_conv(x, sd, f"{key}.body.0")), sd, f"{key}.body.2")


def _upsample(x: torch.Tensor, sd: dict[str, torch.Tensor], key: str, scale: int) -> torch.Tensor:
    if scale == 3:
        return F.pixel_shuffle(_conv(x, sd, f"{key}.0"), 3)
    x = F.pixel_shuffle(_conv(x, sd, f"{key}.0"), 2)
    if scale == 4:
        x = F.pixel_shuffle(_conv(x, sd, f"{key}.2"), 2)
    return x


def _body(x: torch.Tensor, sd: dict[str, torch.Tensor], n_resblocks: int, res_scale: float) -> torch.Tensor:
    r = x
    for i in range(n_resblocks):
        r = _resblock(r, sd, f"body.{i}", res_scale)
    return x + _conv(r, sd, f"body.{n_resblocks}")


def ref_edsr(sd, x, n_resblocks: int, scale: int, res_scale: float) -> torch.Tensor:
    x = F.conv2d(x, sd["sub_mean.weight"], sd["sub_mean.bias"])
    x = _body(_conv(x, sd, "head.0"), sd, n_resblocks, res_scale)
    x = _conv(_upsample(x, sd, "tail.0", scale), sd, "tail.1")
    return F.conv2d(x, sd["add_mean.weight"], sd["add_mean.bias"])


def ref_mdsr(sd, x, n_resblocks: int, branch: int, scale: int, res_scale: float = 1.0) -> torch.Tensor:
    x = F.conv2d(x, sd["sub_mean.weight"], sd["sub_mean.bias"])
    x = _conv(x, sd, "head.0")
    x = _resblock(_resblock(x, sd, f"pre_process.{branch}.0", 1.0), sd, f"pre_process.{branch}.1", 1.0)
    x = _body(x, sd, n_resblocks, res_scale)
    x = _conv(_upsample(x, sd, f"upsample.{branch}", scale), sd, "tail.0")
    return F.conv2d(x, sd["add_mean.weight"], sd["add_mean.bias"])


# Every released variant


@dataclass(frozen=True)
class Variant:
    name: str  # official release name
    build: Callable[[], nn.Module]
    arch: str
    n_resblocks: int
    n_feats: int
    scales: tuple[int, ...]
    res_scale: float
    params_m: float  # as published
    digits: int  # precision of the published number

    def layout(self) -> dict[str, tuple[int, ...]]:
        if self.arch == "edsr":
            return edsr_layout(self.n_resblocks, self.n_feats, self.scales[0])
        return mdsr_layout(self.n_resblocks, self.n_feats, self.scales)

    def reference(self, sd, x: torch.Tensor, scale: int, res_scale: float | None = None) -> torch.Tensor:
        rs = self.res_scale if res_scale is None else res_scale
        if self.arch == "edsr":
            return ref_edsr(sd, x, self.n_resblocks, scale, rs)
        return ref_mdsr(sd, x, self.n_resblocks, self.scales.index(scale), scale, rs)


VARIANTS = [
    Variant("edsr_baseline_x2", lambda: models.edsr_baseline(2), "edsr", 16, 64, (2,), 1.0, 1.37, 2),
    Variant("edsr_baseline_x3", lambda: models.edsr_baseline(3), "edsr", 16, 64, (3,), 1.0, 1.55, 2),
    Variant("edsr_baseline_x4", lambda: models.edsr_baseline(4), "edsr", 16, 64, (4,), 1.0, 1.52, 2),
    Variant("edsr_x2", lambda: models.edsr_paper(2), "edsr", 32, 256, (2,), 0.1, 40.7, 1),
    Variant("edsr_x3", lambda: models.edsr_paper(3), "edsr", 32, 256, (3,), 0.1, 43.7, 1),
    Variant("edsr_x4", lambda: models.edsr_paper(4), "edsr", 32, 256, (4,), 0.1, 43.1, 1),
    Variant("mdsr_baseline", models.mdsr_baseline, "mdsr", 16, 64, (2, 3, 4), 1.0, 3.2, 1),
    Variant("mdsr", models.mdsr_paper, "mdsr", 80, 64, (2, 3, 4), 1.0, 8.0, 1),
]


ALL_VARIANTS = [pytest.param(v, id=v.name) for v in VARIANTS]


# The 40 M-parameter paper models take a few seconds each on two cores.
ALL_VARIANTS_SLOW_MARKED = [
    pytest.param(v, id=v.name, marks=[pytest.mark.slow] if v.n_feats == 256 else []) for v in VARIANTS
]


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mean" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()
