"""Tests for edsr_ray.models.

State dicts are built here from the official key layout (REFERENCE-edsr.md) with random tensors, never taken from
the model under test, and model outputs are compared with a plain functional PyTorch forward written in this file.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edsr_ray import models
from edsr_ray.config import ModelConfig
from edsr_ray.errors import LocationError, ModelLoadError

MEAN = (0.4488, 0.4371, 0.4040)  # DIV2K RGB mean from the paper's code
TINY_R, TINY_F = 2, 8

# --------------------------------------------------------------------------------------------------------------------
# The official layout, written out from the reference


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


# --------------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------------
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


@pytest.fixture(scope="module")
def lr_input() -> torch.Tensor:
    """A 12x10 crop of a real photo, (1, 3, 12, 10) float in [0, 255]."""
    from edsr_ray.samples import photos

    crop = photos()["coffee"][100:112, 200:210]
    # contiguous NCHW: a permuted (channels-last) view would send the convs down a much slower path on CPU
    return torch.from_numpy(np.array(crop)).permute(2, 0, 1)[None].float().contiguous()


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_variant_layout_parameter_count_and_config(variant: Variant):
    with torch.device("meta"):  # shapes only, instant even for 43 M parameters
        model = variant.build()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == variant.layout()
    # The official module order, so our state dicts list keys like the released files.
    assert list(got) == list(variant.layout())

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    # The published counts are the trainable parameters; the two fixed mean shifts add 2 x 12 and do not change them.
    assert total - trainable == 2 * (3 * 3 + 3)
    assert round(trainable / 1e6, variant.digits) == variant.params_m
    assert round(total / 1e6, variant.digits) == variant.params_m
    assert not model.sub_mean.weight.requires_grad and not model.add_mean.bias.requires_grad

    expected = ModelConfig(variant.arch, variant.n_resblocks, variant.n_feats, variant.scales, variant.res_scale)
    assert model.config == expected
    assert model.scales == variant.scales
    assert models.VARIANTS[variant.name] == expected


@pytest.mark.parametrize("variant", ALL_VARIANTS_SLOW_MARKED)
def test_official_state_dict_loads_strictly_and_matches_functional_forward(variant: Variant, lr_input, tmp_path):
    sd = random_state_dict(variant.layout(), seed=7)

    model = variant.build()
    model.load_state_dict(sd, strict=True)
    model.eval()
    from_dict = models.load_model(sd)
    path = tmp_path / f"{variant.name}.pt"
    torch.save(sd, path)
    from_file = models.load_model(path)
    for loaded in (from_dict, from_file):
        assert loaded.config == model.config
        assert not loaded.training
        assert not loaded.sub_mean.weight.requires_grad
        assert all(p.requires_grad for n, p in loaded.named_parameters() if "mean" not in n)

    h, w = lr_input.shape[-2:]
    with torch.no_grad():
        for scale in variant.scales:
            expected = variant.reference(sd, lr_input, scale)
            assert expected.shape == (1, 3, h * scale, w * scale)
            assert expected.abs().max() > 1  # the comparison is not between two near-zero tensors
            for net in (model, from_dict, from_file):
                torch.testing.assert_close(net(lr_input, scale), expected, atol=1e-3, rtol=0)
    # load_model copied the caller's tensors instead of aliasing them.
    assert from_dict.head[0].weight.data_ptr() != sd["head.0.weight"].data_ptr()


# --------------------------------------------------------------------------------------------------------------------
# Reading the architecture off the weights


@pytest.mark.parametrize(
    "layout, expected",
    [
        (edsr_layout(TINY_R, TINY_F, 2), ModelConfig("edsr", TINY_R, TINY_F, (2,))),
        (edsr_layout(TINY_R, TINY_F, 3), ModelConfig("edsr", TINY_R, TINY_F, (3,))),
        (edsr_layout(5, TINY_F, 4), ModelConfig("edsr", 5, TINY_F, (4,))),
        (mdsr_layout(TINY_R, TINY_F), ModelConfig("mdsr", TINY_R, TINY_F, (2, 3, 4))),
        (mdsr_layout(3, TINY_F, (2, 4)), ModelConfig("mdsr", 3, TINY_F, (2, 4))),
        (mdsr_layout(1, TINY_F, (3,)), ModelConfig("mdsr", 1, TINY_F, (3,))),
        (edsr_layout(TINY_R, TINY_F, 2, n_colors=1), ModelConfig("edsr", TINY_R, TINY_F, (2,), n_colors=1)),
    ],
    ids=["edsr-x2", "edsr-x3", "edsr-x4-R5", "mdsr", "mdsr-x2x4", "mdsr-x3", "edsr-grey"],
)
def test_infer_model_config_from_keys_and_shapes(layout, expected):
    sd = random_state_dict(layout)
    assert models.infer_model_config(sd) == expected
    model = models.load_model(sd)
    assert model.config == expected
    assert model.scales == expected.scales


@pytest.mark.parametrize("rgb_range", [1, 255, 1023])
def test_rgb_range_is_read_from_the_mean_shift(rgb_range, lr_input):
    sd = random_state_dict(edsr_layout(TINY_R, TINY_F, 2), rgb_range=rgb_range)
    model = models.load_model(sd)
    assert model.config.rgb_range == rgb_range
    x = lr_input * (rgb_range / 255)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref_edsr(sd, x, TINY_R, 2, 1.0), atol=1e-3, rtol=0)


def test_inconsistent_mean_shift_is_an_error():
    sd = random_state_dict(edsr_layout(TINY_R, TINY_F, 2))
    sd["sub_mean.bias"] = torch.tensor([-100.0, -20.0, -3.0])
    with pytest.raises(ModelLoadError, match=r"sub_mean\.bias .* rgb_range"):
        models.infer_model_config(sd, source="odd.pt")


def test_res_scale_convention_and_override(lr_input):
    wide = random_state_dict(edsr_layout(1, 256, 2), seed=3)
    narrow = random_state_dict(edsr_layout(1, 64, 2), seed=3)
    assert models.infer_model_config(wide).res_scale == 0.1
    assert models.infer_model_config(narrow).res_scale == 1.0
    assert models.infer_model_config(narrow, res_scale=0.25).res_scale == 0.25

    model = models.load_model(wide, res_scale=0.3)
    assert model.config.res_scale == 0.3
    with torch.no_grad():
        out = model(lr_input)
        torch.testing.assert_close(out, ref_edsr(wide, lr_input, 1, 2, 0.3), atol=1e-3, rtol=0)
        # res_scale really changes the result, so getting it wrong would be caught above.
        assert (out - ref_edsr(wide, lr_input, 1, 2, 0.1)).abs().max() > 1e-2


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_are_stripped(prefix, lr_input):
    sd = random_state_dict(edsr_layout(TINY_R, TINY_F, 3), seed=5)
    wrapped = {prefix + k: v for k, v in sd.items()}
    assert models.infer_model_config(wrapped) == ModelConfig("edsr", TINY_R, TINY_F, (3,))
    model = models.load_model(wrapped)
    with torch.no_grad():
        torch.testing.assert_close(model(lr_input, 3), ref_edsr(sd, lr_input, TINY_R, 3, 1.0), atol=1e-3, rtol=0)


def test_state_dict_under_a_wrapper_key(tmp_path):
    sd = random_state_dict(edsr_layout(TINY_R, TINY_F, 2))
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, path)
    assert models.load_model(path).config == ModelConfig("edsr", TINY_R, TINY_F, (2,))


# --------------------------------------------------------------------------------------------------------------------
# The project's own checkpoints


def _randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mean" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def test_project_checkpoint_round_trip_restores_res_scale_without_flags(tmp_path, lr_input):
    model = _randomised(models.EDSR(TINY_R, TINY_F, 3, res_scale=0.37))
    ckpt_dir = tmp_path / "run" / "checkpoint_000001"
    path = models.save_model(model, ckpt_dir / "model.pt")
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["model.pt"]  # no temp file left behind

    raw = torch.load(path, weights_only=True)  # only plain types and tensors inside
    assert raw["format"] == models.CHECKPOINT_FORMAT
    assert raw["model_config"]["res_scale"] == 0.37
    assert raw["model_config"]["scales"] == [3]
    assert set(raw["state_dict"]) == set(edsr_layout(TINY_R, TINY_F, 3))

    with torch.no_grad():
        expected = model(lr_input, 3)
        for source in (path, ckpt_dir, str(ckpt_dir), models.model_checkpoint(model)):
            loaded = models.load_model(source)
            assert loaded.config == model.config
            assert loaded.config.res_scale == 0.37
            assert torch.equal(loaded(lr_input, 3), expected)
        # A bare state dict cannot know res_scale: the convention gives 1, and the output differs.
        bare = models.load_model(model.state_dict())
        assert bare.config.res_scale == 1.0
        assert not torch.allclose(bare(lr_input, 3), expected, atol=1e-2)
        # An explicit res_scale overrides the stored one.
        assert models.load_model(path, res_scale=0.5).config.res_scale == 0.5


def test_save_model_replaces_an_existing_file_atomically(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"old contents")
    models.save_model(models.EDSR(1, 4, 2), path)
    assert models.load_model(path).config == ModelConfig("edsr", 1, 4, (2,))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_checkpoint_of_wrapped_models_has_plain_keys():
    model = _randomised(models.MDSR(1, TINY_F, (2, 4)))
    plain = models.model_checkpoint(model)
    assert plain["model_config"]["arch"] == "mdsr" and plain["model_config"]["scales"] == [2, 4]
    for wrapped in (nn.DataParallel(model), torch.compile(model)):
        ckpt = models.model_checkpoint(wrapped)
        assert list(ckpt["state_dict"]) == list(plain["state_dict"])
        assert ckpt["model_config"] == plain["model_config"]
        assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in plain["state_dict"].items())
        assert models.receptive_radius(wrapped) == models.receptive_radius(model)


# --------------------------------------------------------------------------------------------------------------------
# Refusing unsafe and foreign files


class _Payload:
    """Unpickling this object runs ``open(marker, "w")``, i.e. creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_refused_and_not_executed(tmp_path):
    sd = random_state_dict(edsr_layout(1, 4, 2))
    # Prove the payload is live: an unsafe load does create its marker.
    armed_marker = tmp_path / "armed-marker"
    torch.save({**sd, "extra": _Payload(armed_marker)}, tmp_path / "armed.pt")
    torch.load(tmp_path / "armed.pt", weights_only=False)["extra"].close()
    assert armed_marker.exists()

    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({**sd, "extra": _Payload(marker)}, path)
    for load in (models.load_model, lambda p: models.load_matching(models.EDSR(1, 4, 2), p)):
        with pytest.raises(ModelLoadError) as err:
            load(path)
        message = str(err.value)
        assert str(path) in message
        assert "refuses to unpickle arbitrary objects" in message
        assert "Nothing was executed" in message
        assert not marker.exists()


def test_saved_module_is_refused(tmp_path):
    path = tmp_path / "whole-model.pt"
    torch.save(models.EDSR(1, 4, 2), path)
    with pytest.raises(ModelLoadError, match=r"refuses to unpickle arbitrary objects .*Nothing was executed"):
        models.load_model(path)


def _resnet_like_state_dict() -> dict[str, torch.Tensor]:
    sd = {"conv1.weight": torch.zeros(64, 3, 7, 7)}
    for name in ("bn1", "layer1.0.bn1", "layer1.0.bn2"):
        sd.update({f"{name}.{p}": torch.zeros(64) for p in ("weight", "bias", "running_mean", "running_var")})
        sd[f"{name}.num_batches_tracked"] = torch.tensor(0)
    sd["layer1.0.conv1.weight"] = torch.zeros(64, 64, 3, 3)
    sd["layer1.0.conv2.weight"] = torch.zeros(64, 64, 3, 3)
    sd["fc.weight"] = torch.zeros(1000, 64)
    sd["fc.bias"] = torch.zeros(1000)
    return sd


def test_other_architecture_lists_expected_and_found(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save(_resnet_like_state_dict(), path)
    with pytest.raises(ModelLoadError) as err:
        models.load_model(path)
    message = str(err.value)
    assert str(path) in message
    assert "expected an EDSR state dict" in message and "head.0.weight [F, C, 3, 3]" in message
    assert "found conv1.weight [64, 3, 7, 7], bn1.weight [64]" in message
    assert "keys in all" in message

    with pytest.raises(ModelLoadError, match=r"^resnet-in-memory: not an EDSR/MDSR state dict"):
        models.infer_model_config(_resnet_like_state_dict(), source="resnet-in-memory")


def test_damaged_edsr_state_dict_names_each_problem():
    sd = random_state_dict(edsr_layout(TINY_R, TINY_F, 2))
    del sd["body.1.body.2.bias"]
    sd["tail.1.weight"] = torch.zeros(3, TINY_F, 5, 5)
    sd["extra.weight"] = torch.zeros(2)
    with pytest.raises(ModelLoadError) as err:
        models.load_model(sd)
    message = str(err.value)
    assert "EDSR x2 (n_resblocks=2, n_feats=8" in message
    assert "missing 1 keys: body.1.body.2.bias [8]" in message
    assert "unexpected keys: extra.weight [2]" in message
    assert "tail.1.weight is [3, 8, 5, 5], expected [3, 8, 3, 3]" in message


def _write(tmp_path, name: str, content) -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    return str(path)


@pytest.mark.parametrize(
    "name, content, pattern",
    [
        ("empty.pt", b"", r"the file is empty \(0 bytes\)"),
        ("noise.pt", random.Random(0).randbytes(4096), r"not a PyTorch weights file \(4096 bytes of binary data\)"),
        ("notes.pt", b"these are not weights\n", r"not a PyTorch weights file \(22 bytes of UTF-8 text\)"),
        (
            "plain-pickle.pt",
            b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}\x94.",
            r"not a PyTorch weights file \(a Python pickle\)",
        ),
        ("tensor.pt", torch.zeros(3), r"expected a state dict .* found a Tensor"),
        ("other-format.pt", {"format": "someone-else/v9", "state_dict": {}}, r"unknown checkpoint format"),
        (
            "bad-config.pt",
            {"format": "edsr-ray/model-v1", "model_config": {"arch": "edsr", "scales": [5]}, "state_dict": {}},
            r"\(model_config\): scales: scale 5 is not supported",
        ),
    ],
    ids=["zero-byte", "random-bytes", "text", "plain-pickle", "tensor", "foreign-format", "invalid-config"],
)
def test_bad_files_are_clear_errors(tmp_path, name, content, pattern):
    path = _write(tmp_path, name, content)
    with pytest.raises(ModelLoadError, match=pattern) as err:
        models.load_model(path)
    assert path in str(err.value)
    if isinstance(content, bytes) and content:  # the message names the type, never quotes the file
        assert repr(content[:8])[2:-1] not in str(err.value) and content[:8].hex() not in str(err.value)


def test_special_files_and_foreign_schemes_fail_clearly_without_blocking(tmp_path, finishes):
    os.mkfifo(tmp_path / "model.pt")
    (tmp_path / "zero.pt").symlink_to("/dev/zero")
    (tmp_path / "ckpt").mkdir()
    os.mkfifo(tmp_path / "ckpt" / "model.pt")  # a checkpoint folder whose model.pt is a FIFO
    cases = {
        tmp_path / "model.pt": (ModelLoadError, "not a regular file: a FIFO"),
        tmp_path / "zero.pt": (ModelLoadError, "not a regular file: a character device reached through a symbolic"),
        tmp_path / "ckpt": (ModelLoadError, "not a regular file: a FIFO"),
        "gs://bucket/model.pt": (LocationError, "unsupported scheme 'gs://'"),
        "S3://bucket/model.pt": (LocationError, "did you mean s3://?"),
        "http://host/model.pt": (LocationError, "unsupported scheme 'http://'"),
        "gs:bucket/model.pt": (LocationError, "./gs:bucket/model.pt"),
    }
    for source, (error, words) in cases.items():
        with pytest.raises(error) as info:
            finishes(lambda s=source: models.load_model(s), 20)
        assert words in str(info.value) and str(source).split("://")[-1] in str(info.value), info.value
        if isinstance(source, str):  # the supported kinds are named
            assert "s3://bucket/key" in str(info.value) and "models:/" in str(info.value)


def test_missing_file_and_empty_directory(tmp_path):
    missing = tmp_path / "nowhere" / "edsr_x2.pt"
    with pytest.raises(ModelLoadError, match=r"no such file") as err:
        models.load_model(missing)
    assert str(missing) in str(err.value)

    folder = tmp_path / "checkpoint_000003"
    folder.mkdir()
    (folder / "notes.txt").write_text("not weights")
    with pytest.raises(ModelLoadError, match=r"no model\.pt .* it holds notes\.txt") as err:
        models.load_model(folder)
    assert str(folder) in str(err.value)

    with pytest.raises(ModelLoadError, match="unsupported model source int"):
        models.load_model(42)


# --------------------------------------------------------------------------------------------------------------------
# x2 -> x3 / x4 initialisation


@pytest.fixture
def x2_weights(tmp_path) -> tuple[dict[str, torch.Tensor], str]:
    sd = random_state_dict(edsr_layout(TINY_R, TINY_F, 2), seed=11)
    path = tmp_path / "edsr_x2.pt"
    torch.save(sd, path)
    return sd, str(path)


@pytest.mark.parametrize(
    "scale, left, skipped",
    [
        (3, ["tail.0.0.weight", "tail.0.0.bias"], ["tail.0.0.weight", "tail.0.0.bias"]),
        (4, ["tail.0.2.weight", "tail.0.2.bias"], []),
    ],
)
def test_x2_initialisation_reports_what_was_left_at_init(x2_weights, scale, left, skipped, caplog):
    sd, path = x2_weights
    for source in (path, sd):
        model = models.EDSR(TINY_R, TINY_F, scale)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with caplog.at_level(logging.INFO, logger="edsr_ray.models"):
            report = models.init_from(model, source)
        assert report.left_at_init == left
        assert report.skipped == skipped
        assert set(report.copied) == set(before) - set(left)
        after = model.state_dict()
        for key in report.copied:
            assert torch.equal(after[key], sd[key]), key
        for key in left:
            assert torch.equal(after[key], before[key]), key
        assert "left at init: " + ", ".join(left) in caplog.text


def test_initialisation_with_another_body_names_both(x2_weights):
    _, path = x2_weights
    with pytest.raises(ModelLoadError, match=r"n_resblocks=2, n_feats=8 but the model's has n_resblocks=2, n_feats=16"):
        models.load_matching(models.EDSR(TINY_R, 16, 3), path)
    with pytest.raises(ModelLoadError, match=r"n_resblocks=2, n_feats=8 but the model's has n_resblocks=3, n_feats=8"):
        models.load_matching(models.EDSR(3, TINY_F, 3), path)


def test_initialisation_with_nothing_in_common():
    with pytest.raises(ModelLoadError, match="no tensor matches the model"):
        models.load_matching(models.EDSR(1, 4, 2), {"encoder.weight": torch.zeros(4, 4)})


def test_initialisation_keeps_the_models_own_mean_shift():
    sd = random_state_dict(edsr_layout(TINY_R, TINY_F, 2), rgb_range=1)
    model = models.EDSR(TINY_R, TINY_F, 2, rgb_range=255)
    report = models.load_matching(model, sd)
    assert set(report.skipped) == {"sub_mean.bias", "add_mean.bias"}
    assert torch.allclose(model.sub_mean.bias, -255 * torch.tensor(MEAN))


# --------------------------------------------------------------------------------------------------------------------
# Scales, inputs and precision


def test_mdsr_forward_gives_each_scale_and_refuses_others(lr_input):
    model = models.MDSR(TINY_R, TINY_F).eval()
    h, w = lr_input.shape[-2:]
    with torch.no_grad():
        outputs = {s: model(lr_input, s) for s in (2, 3, 4)}
    for s, out in outputs.items():
        assert out.shape == (1, 3, h * s, w * s)
    with pytest.raises(ValueError, match=r"supports scales \[2, 3, 4\], got scale=8"):
        model(lr_input, 8)
    with pytest.raises(TypeError):
        model(lr_input)  # MDSR needs the scale


def test_mdsr_subset_uses_branch_positions(lr_input):
    sd = random_state_dict(mdsr_layout(TINY_R, TINY_F, (2, 4)), seed=2)
    model = models.MDSR(TINY_R, TINY_F, scales=(2, 4))
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        for branch, scale in enumerate((2, 4)):
            expected = ref_mdsr(sd, lr_input, TINY_R, branch, scale)
            torch.testing.assert_close(model(lr_input, scale), expected, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match=r"supports scales \[2, 4\], got scale=3"):
        model(lr_input, 3)


def test_edsr_scale_argument_and_input_shape_are_checked(lr_input):
    model = models.EDSR(1, 4, 2).eval()
    with torch.no_grad():
        assert model(lr_input).shape == model(lr_input, 2).shape == (1, 3, 24, 20)
    with pytest.raises(ValueError, match=r"upscales x2 only, got scale=3"):
        model(lr_input, 3)
    with pytest.raises(ValueError, match=r"expects a \(B, 3, H, W\) tensor, got shape \(3, 12, 10\)"):
        model(lr_input[0])


def test_invalid_constructor_arguments_name_the_problem():
    with pytest.raises(ValueError, match=r"EDSR\(\.\.\.\): scales: scale 5 is not supported"):
        models.EDSR(1, 4, 5)
    with pytest.raises(ValueError, match=r"MDSR\(\.\.\.\): n_feats: must be >= 1"):
        models.MDSR(1, 0)


def test_output_mean_shift_stays_float32_under_bf16_autocast(lr_input):
    model = _randomised(models.EDSR(1, TINY_F, 2))
    with torch.no_grad():
        full = model(lr_input)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(lr_input)
    assert full.dtype == half.dtype == torch.float32
    assert (half - full).abs().max() < 4  # bf16 network, fp32 mean: a few grey levels at most


# --------------------------------------------------------------------------------------------------------------------
# Receptive field


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_receptive_radius_of_variants(variant: Variant):
    per_lr_conv = 1 + 2 * variant.n_resblocks + 1 + 1  # head, ResBlocks, body conv, first upsampling conv
    if variant.arch == "mdsr":
        per_lr_conv += 4 * 2  # four 5x5 convs
    # Convs after the pixel shuffle add less than one LR pixel together; plus the safety margin.
    assert models.receptive_radius(models.VARIANTS[variant.name]) == per_lr_conv + 1 + models.RECEPTIVE_MARGIN


@pytest.mark.parametrize("arch, scale", [("edsr", 2), ("edsr", 3), ("edsr", 4), ("mdsr", 3), ("mdsr", 4)])
def test_receptive_radius_matches_the_measured_field(arch, scale):
    torch.manual_seed(0)
    model = models.EDSR(1, 16, scale) if arch == "edsr" else models.MDSR(1, 16, (scale,))
    radius = models.receptive_radius(model)
    size = 2 * radius + 9
    centre = size // 2
    x = (torch.rand(1, 3, size, size) * 255).requires_grad_()
    out = model(x, scale)  # (1, 3, size*s, size*s)
    # The s x s output pixels (every sub-pixel phase) above the centre LR pixel: one backward pass gives the union
    # of their input fields (a sum of gradients does not cancel to exactly zero).
    patch = out[0, :, centre * scale : (centre + 1) * scale, centre * scale : (centre + 1) * scale]
    (grad,) = torch.autograd.grad(patch.sum(), x)
    ys, xs = (grad[0].abs().sum(0) > 0).nonzero(as_tuple=True)
    measured = max(int((ys - centre).abs().max()), int((xs - centre).abs().max()))
    assert measured + models.RECEPTIVE_MARGIN == radius


# --------------------------------------------------------------------------------------------------------------------
# Object storage and the model registry (real services)


@pytest.mark.slow
def test_save_and_load_through_s3(s3, lr_input):
    from edsr_ray.errors import StorageError

    model = _randomised(models.EDSR(1, TINY_F, 2, res_scale=0.5))
    uri = models.save_model(model, "s3://edsr/test-models/run-1/checkpoint_000001/model.pt")
    with torch.no_grad():
        expected = model(lr_input)
        # The object itself, and the checkpoint "directory" (a prefix holding model.pt) with or without a slash.
        for source in (
            uri,
            "s3://edsr/test-models/run-1/checkpoint_000001",
            "s3://edsr/test-models/run-1/checkpoint_000001/",
        ):
            loaded = models.load_model(source)
            assert loaded.config == model.config
            assert torch.equal(loaded(lr_input), expected)
    init = models.EDSR(1, TINY_F, 4)
    assert models.init_from(init, uri).left_at_init == ["tail.0.2.weight", "tail.0.2.bias"]
    with pytest.raises(StorageError, match=r"test-models/missing\.pt"):
        models.load_model("s3://edsr/test-models/missing.pt")


@pytest.mark.slow
def test_load_from_the_mlflow_registry(tmp_path, monkeypatch, lr_input):
    from edsr_ray import tracking
    from edsr_ray.config import TrackingConfig

    monkeypatch.setenv("EDSR_RAY_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.resolve_tracking_uri()
    run_id = tracking.find_or_create_run(TrackingConfig(experiment="models-test"), "runs/m", "m", uri, resume=False)
    logger = tracking.RunLogger(run_id, uri)
    model = _randomised(models.MDSR(1, TINY_F, (2, 3)))
    model_uri = logger.log_model(models.save_model(model, tmp_path / "model.pt"))
    assert logger.register("tiny-mdsr", model_uri) == "1"
    with torch.no_grad():
        expected = model(lr_input, 3)
        for source in ("models:/tiny-mdsr/1", f"runs:/{run_id}/model"):
            loaded = models.load_model(source)
            assert loaded.config == model.config
            assert torch.equal(loaded(lr_input, 3), expected)
