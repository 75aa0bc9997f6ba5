"""The one inference path: seam-free tiling, ×8 self-ensemble, decoded images, precision and the NaN fallback.

Reference outputs come from plain forwards written here (``model(x, scale)`` on the whole image, a rot90-based
8-way ensemble, a no-overlap tiling), never from the code under test.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edsr_ray import inference
from edsr_ray.codecs import DecodedImage, decode_image, encode_image
from edsr_ray.config import InferenceConfig, ModelConfig
from edsr_ray.errors import ConfigError, ImageError
from edsr_ray.imaging import imresize
from edsr_ray.inference import UpscaleCancelled, Upscaler, stop_when, upscale, upscale_decoded, upscale_tensor
from edsr_ray.models import EDSR, MDSR, edsr_baseline, receptive_radius

TILES = (32, 48, 64, 100, 512)
# (name, scale): tiny EDSR per scale and one tiny MDSR serving all three.
MODELS = [("edsr", 2), ("edsr", 3), ("edsr", 4), ("mdsr", 2), ("mdsr", 3), ("mdsr", 4)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    models = {f"edsr_x{s}": EDSR(2, 8, s).eval() for s in (2, 3, 4)}
    models["mdsr"] = MDSR(2, 8, (2, 3, 4)).eval()
    return models


def _model(tiny_models, name: str, scale: int) -> nn.Module:
    return tiny_models["mdsr"] if name == "mdsr" else tiny_models[f"edsr_x{scale}"]


@pytest.fixture(scope="module")
def images(photos) -> dict[str, np.ndarray]:
    """Sizes not divisible by any tile: random noise 75x97 and a real photo crop 131x173."""
    rng = np.random.default_rng(1)
    return {
        "noise_75x97": rng.integers(0, 256, (75, 97, 3), dtype=np.uint8),
        "photo_131x173": np.ascontiguousarray(photos["coffee"][37:168, 51:224]),
    }


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image.copy()).permute(2, 0, 1).unsqueeze(0).float()  # (1, 3, H, W)


def _quantize(y: torch.Tensor) -> np.ndarray:
    return y[0].clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _plain(model: nn.Module, image: np.ndarray, scale: int) -> torch.Tensor:
    """Whole-image forward, written here: the reference every other output is compared with."""
    with torch.no_grad():
        return model(_to_tensor(image), scale)  # (1, 3, H*s, W*s)


# --------------------------------------------------------------------------------------------------------------------
# Tiling


def test_tile_plan_covers_image_with_full_context():
    for length, tile, radius in itertools.product([1, 7, 31, 32, 33, 75, 97, 131, 200], [8, 13, 32, 64], [0, 3, 9, 20]):
        axis = inference._split_axis(length, tile, radius)
        covered = np.zeros(length, dtype=int)
        for start, end, patch_start in axis.cores:
            assert 0 < end - start <= tile
            covered[start:end] += 1
            assert patch_start >= 0 and patch_start + axis.patch <= length
            # The patch holds `radius` real pixels beyond the core, or reaches the image border, on each side.
            assert patch_start <= max(start - radius, 0)
            assert patch_start + axis.patch >= min(end + radius, length)
        assert (covered == 1).all(), f"cores must partition the axis ({length=}, {tile=})"
        if length > tile:
            assert len(axis.cores) == -(-length // tile)


@pytest.mark.parametrize("name,scale", MODELS)
@pytest.mark.parametrize("image_name", ["noise_75x97", "photo_131x173"])
def test_tiled_equals_whole_image(tiny_models, images, name, scale, image_name):
    model, image = _model(tiny_models, name, scale), images[image_name]
    reference = _plain(model, image, scale)
    for tile in TILES:
        up = Upscaler(model, tile=tile, tile_batch=3)
        plan = up.plan(*image.shape[:2], 1, scale)
        if tile < max(image.shape[:2]):
            assert len(plan.rows.cores) * len(plan.cols.cores) > 1, "the image must really be tiled"

        tiled_float = up.upscale_tensor(_to_tensor(image), scale)
        assert tiled_float.shape == reference.shape
        assert (tiled_float - reference).abs().max().item() < 1e-3, f"{tile=}"

        if tile not in (32, 100):
            continue  # the uint8 path shares everything but the final quantisation
        tiled = up.upscale(image, scale)
        assert tiled.shape == (image.shape[0] * scale, image.shape[1] * scale, 3) and tiled.dtype == np.uint8
        assert np.abs(tiled.astype(int) - _quantize(reference)).max() <= 1, f"{tile=}"


def test_naive_tiling_would_leave_seams(tiny_models, images):
    """The comparison above can fail: cutting tiles without context changes the output along every tile border."""
    model, image, scale, tile = tiny_models["edsr_x2"], images["photo_131x173"], 2, 32
    reference = _plain(model, image, scale)
    x = _to_tensor(image)
    naive = torch.empty_like(reference)
    with torch.no_grad():
        for r in range(0, image.shape[0], tile):
            for c in range(0, image.shape[1], tile):
                patch = x[:, :, r : r + tile, c : c + tile]
                h, w = patch.shape[-2:]
                naive[:, :, r * scale : (r + h) * scale, c * scale : (c + w) * scale] = model(patch, scale)
    seam = (naive - reference).abs()
    assert seam.max().item() > 5.0
    # Far from tile borders the naive output is right: only the seams differ.
    interior = seam[..., 20 * scale : 24 * scale, 20 * scale : 24 * scale]
    assert interior.max().item() < 1e-3
    # ... while the seam-free tiler matches everywhere.
    tiled = upscale_tensor(model, x, scale, tile=tile)
    assert (tiled - reference).abs().max().item() < 1e-3


def test_whole_image_is_the_plain_forward(tiny_models, photo):
    model = tiny_models["edsr_x3"]
    image = photo[:60, :80]
    out = upscale(model, image, 3)
    # The Upscaler feeds the network channels_last (NHWC) tensors, and convolutions sum in an order that depends on
    # the memory layout: the forward of an NCHW tensor converted to channels_last gives its pixels exactly, the
    # forward of the NCHW tensor itself within one rounding step.
    nchw = _to_tensor(image).contiguous()
    with torch.no_grad():
        same_layout, other_layout = model(nchw.contiguous(memory_format=torch.channels_last), 3), model(nchw, 3)
    np.testing.assert_array_equal(out, _quantize(same_layout))
    assert np.abs(out.astype(int) - _quantize(other_layout).astype(int)).max() <= 1


def test_automatic_tiles_when_the_image_exceeds_the_memory_budget(tiny_models, images):
    model, image = tiny_models["edsr_x2"], images["photo_131x173"]
    # A budget for about 40x40 LR pixels at once: the 131x173 image has to be tiled.
    up = Upscaler(model, memory_budget=40 * 40 * Upscaler(model)._bytes_per_pixel(2))
    plan = up.plan(*image.shape[:2], 1, 2)
    assert len(plan.rows.cores) * len(plan.cols.cores) > 1
    assert plan.rows.patch * plan.cols.patch * plan.batch <= 40 * 40 * 1.05
    np.testing.assert_allclose(up.upscale_tensor(_to_tensor(image), 2), _plain(model, image, 2), atol=1e-3)


def test_batches_of_images_and_tiles(tiny_models, images):
    model = tiny_models["mdsr"]
    rng = np.random.default_rng(2)
    batch = torch.from_numpy(rng.uniform(0, 255, (3, 3, 41, 57)).astype(np.float32))
    with torch.no_grad():
        reference = model(batch, 4)
    for tile, tile_batch in ((None, 2), (16, 5), (24, 1)):
        out = upscale_tensor(model, batch, 4, tile=tile, tile_batch=tile_batch)
        assert out.shape == (3, 3, 41 * 4, 57 * 4)
        assert (out - reference).abs().max().item() < 1e-3


def test_tiled_equals_whole_image_for_the_baseline_model(photo):
    """Full-depth receptive field (16 blocks): interior tiles whose context is exactly the receptive radius."""
    torch.manual_seed(3)
    model = edsr_baseline(2).eval()
    radius = receptive_radius(model)
    image = np.ascontiguousarray(photo[100:148, 150:300])  # 48x150: tiles along the width only, to stay cheap
    up = Upscaler(model, tile=44, tile_batch=2)
    plan = up.plan(*image.shape[:2], 1, 2)
    assert len(plan.cols.cores) == 4 and plan.cols.patch < image.shape[1]
    start, _, patch_start = plan.cols.cores[1]
    assert start - patch_start == radius  # context exactly the radius: any shortfall would show
    reference = _plain(model, image, 2)
    tiled = up.upscale_tensor(_to_tensor(image), 2)
    assert (tiled - reference).abs().max().item() < 1e-3


# --------------------------------------------------------------------------------------------------------------------
# Self-ensemble


def _manual_ensemble(model: nn.Module, x: torch.Tensor, scale: int) -> torch.Tensor:
    """EDSR+ written independently: the 4 rotations of x and of its mirror image, each rotated back, averaged."""
    outs = []
    with torch.no_grad():
        for mirror in (False, True):
            xm = x.flip(-1) if mirror else x
            for k in range(4):
                y = torch.rot90(model(torch.rot90(xm, k, dims=(-2, -1)), scale), -k, dims=(-2, -1))
                outs.append(y.flip(-1) if mirror else y)
    return torch.stack(outs).mean(dim=0)


@pytest.mark.parametrize("name,scale", [("edsr", 2), ("edsr", 3), ("mdsr", 4)])
def test_self_ensemble_equals_manual_eight_way(tiny_models, images, name, scale):
    model, image = _model(tiny_models, name, scale), images["noise_75x97"]
    x = _to_tensor(image)
    expected = _manual_ensemble(model, x, scale)
    out = upscale_tensor(model, x, scale, self_ensemble=True)
    assert (out - expected).abs().max().item() < 1e-3
    # The ensemble really changes the result of a model that is not flip-invariant.
    assert (expected - _plain(model, image, scale)).abs().max().item() > 1.0
    assert np.abs(upscale(model, image, scale, self_ensemble=True).astype(int) - _quantize(expected)).max() <= 1


@pytest.mark.parametrize("tile", [32, 48])
def test_self_ensemble_with_tiles(tiny_models, images, tile):
    model, image = tiny_models["edsr_x3"], images["noise_75x97"]
    x = _to_tensor(image)
    expected = _manual_ensemble(model, x, 3)
    out = upscale_tensor(model, x, 3, self_ensemble=True, tile=tile, tile_batch=4)
    assert (out - expected).abs().max().item() < 1e-3


class _NearestUpsampler(nn.Module):
    """Flip- and transpose-equivariant stand-in for a network: nearest-neighbour upsampling."""

    def __init__(self, scale: int):
        super().__init__()
        self.config = ModelConfig("edsr", 1, 4, (scale,))
        self.scales = (scale,)
        self.anchor = nn.Parameter(torch.zeros(1))  # so the model has a device and dtype

    def forward(self, x: torch.Tensor, scale: int) -> torch.Tensor:
        return F.interpolate(x, scale_factor=scale, mode="nearest") + self.anchor


def test_self_ensemble_of_an_equivariant_model_is_the_model(images):
    image = images["photo_131x173"]
    model = _NearestUpsampler(2)
    out = upscale(model, image, 2, self_ensemble=True, tile=48)
    np.testing.assert_array_equal(out, image.repeat(2, axis=0).repeat(2, axis=1))


# --------------------------------------------------------------------------------------------------------------------
# Decoded images: grey, alpha, 16 bit


def test_decoded_grey_stays_grey(tiny_models, photo):
    model = tiny_models["edsr_x2"]
    grey = (photo[:50, :70] @ np.array([0.299, 0.587, 0.114])).round().astype(np.uint8)
    img = DecodedImage.from_array(grey)
    assert img.grey
    out = upscale_decoded(model, img, 2)
    assert out.grey and out.bit_depth == 8 and out.rgb.shape == (100, 140, 3)
    assert (out.rgb[..., 0] == out.rgb[..., 1]).all() and (out.rgb[..., 1] == out.rgb[..., 2]).all()
    expected = _plain(model, img.rgb, 2)[0].mean(dim=0).clamp(0, 255).round().to(torch.uint8).numpy()
    assert np.abs(out.rgb[..., 0].astype(int) - expected).max() <= 1
    # Written back as a one-channel PNG.
    assert decode_image(encode_image(out)).grey


def test_decoded_rgba_keeps_a_bicubic_alpha(tiny_models, photo):
    model = tiny_models["edsr_x3"]
    rgb = np.ascontiguousarray(photo[:40, :60])
    yy, xx = np.mgrid[:40, :60]
    alpha = np.clip(xx * 4 + yy * 2, 0, 255).astype(np.uint8)
    img = DecodedImage.from_array(np.dstack([rgb, alpha]))
    out = Upscaler(model)(img, 3)
    assert out.alpha is not None and out.alpha.shape == (120, 180)
    np.testing.assert_array_equal(out.alpha, imresize(alpha, 3))
    np.testing.assert_array_equal(out.rgb, upscale(model, rgb, 3))
    decoded = decode_image(encode_image(out))
    np.testing.assert_array_equal(decoded.alpha, out.alpha)


def test_decoded_16_bit_keeps_its_precision(tiny_models, photo):
    model = tiny_models["edsr_x2"]
    rgb8 = np.ascontiguousarray(photo[:40, :50])
    rng = np.random.default_rng(4)
    rgb16 = (rgb8.astype(np.uint16) * 257 + rng.integers(0, 200, rgb8.shape)).astype(np.uint16)
    alpha16 = rng.integers(0, 65536, rgb8.shape[:2]).astype(np.uint16)
    img = decode_image(encode_image(DecodedImage(rgb16, alpha16, 16)))  # through a real 16-bit RGBA PNG
    assert img.bit_depth == 16
    out = upscale_decoded(model, img, 2)
    assert out.bit_depth == 16 and out.rgb.dtype == np.uint16 and out.rgb.shape == (80, 100, 3)
    with torch.no_grad():
        y = model(torch.from_numpy(rgb16.astype(np.float32)).permute(2, 0, 1)[None] / 257.0, 2)
    expected = (y[0] * 257.0).clamp(0, 65535).round().permute(1, 2, 0).numpy()
    assert np.abs(out.rgb.astype(np.float64) - expected).max() <= 257 * 1e-3 + 1
    assert (out.rgb % 257 != 0).mean() > 0.9, "the output is not just 8-bit values times 257"
    assert np.abs(out.rgb / 257.0 - upscale(model, rgb8, 2)).max() < 2.0
    np.testing.assert_array_equal(out.alpha, imresize(alpha16, 2))
    assert out.alpha.dtype == np.uint16 and (out.alpha % 257 != 0).any()


# --------------------------------------------------------------------------------------------------------------------
# Precision and the NaN fallback

MARKER = (255, 0, 255)


class _PoisonedInReducedPrecision(nn.Module):
    """Wraps a model and, only when run in reduced precision, writes a NaN into the output of every patch whose top-left
    LR pixel is MARKER: a stand-in for fp16 overflow that the fallback must catch and recompute in fp32."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.scales = inner.scales

    def forward(self, x: torch.Tensor, scale: int) -> torch.Tensor:
        y = self.inner(x, scale)
        if x.dtype != torch.float32:
            marked = (x[:, :, 0, 0].float() == torch.tensor(MARKER, dtype=torch.float32)).all(dim=1)  # (N,)
            y = y.clone()
            y[marked, :, 5, 5] = float("nan")
        return y


@pytest.fixture
def bf16_on_cpu(monkeypatch):
    """Lift the CPU policy (fp32 only) so reduced precision really runs here; everything else is production code."""
    monkeypatch.setattr(inference, "resolve_precision", lambda precision, device: torch.bfloat16)


def _marked(image: np.ndarray) -> np.ndarray:
    image = image.copy()
    image[..., 1] = np.maximum(image[..., 1], 1)  # no pixel but (0, 0) can equal the marker
    image[0, 0] = MARKER
    return image


def test_reduced_precision_runs_a_converted_copy(bf16_on_cpu, tiny_models, images, caplog):
    inner = tiny_models["edsr_x2"]
    image = images["photo_131x173"]
    with caplog.at_level(logging.WARNING, logger="edsr_ray.inference"):
        out = upscale_tensor(_PoisonedInReducedPrecision(inner), _to_tensor(image), 2)
    assert not caplog.records  # no marker, no fallback
    diff = (out - _plain(inner, image, 2)).abs()
    assert 0 < diff.max().item() < 8.0, "bf16 differs from fp32, but only a little"
    assert next(inner.parameters()).dtype == torch.float32, "the caller's model is left in fp32"


def test_non_finite_output_falls_back_to_fp32_for_that_image(bf16_on_cpu, tiny_models, images, caplog):
    inner = tiny_models["edsr_x2"]
    image = _marked(images["noise_75x97"])
    with caplog.at_level(logging.WARNING, logger="edsr_ray.inference"):
        out = upscale_tensor(_PoisonedInReducedPrecision(inner), _to_tensor(image), 2)
    assert "recomputed them in fp32" in caplog.text and "1 of 1" in caplog.text
    assert torch.isfinite(out).all()
    assert (out - _plain(inner, image, 2)).abs().max().item() < 1e-3  # the whole image in fp32


def test_non_finite_output_falls_back_to_fp32_for_that_tile_only(bf16_on_cpu, tiny_models, images, caplog):
    inner = tiny_models["edsr_x2"]
    image, scale, tile = _marked(images["noise_75x97"]), 2, 32
    up = Upscaler(_PoisonedInReducedPrecision(inner), tile=tile, tile_batch=4)
    plan = up.plan(*image.shape[:2], 1, scale)
    n_patches = len(plan.rows.cores) * len(plan.cols.cores)
    with caplog.at_level(logging.WARNING, logger="edsr_ray.inference"):
        out = up.upscale_tensor(_to_tensor(image), scale)
    assert caplog.text.count("recomputed them in fp32") == 1 and "1 of 4" in caplog.text
    assert torch.isfinite(out).all()
    reference = _plain(inner, image, scale)
    r1, c1 = plan.rows.cores[0][1] * scale, plan.cols.cores[0][1] * scale  # the first core, which held the marker
    assert (out[..., :r1, :c1] - reference[..., :r1, :c1]).abs().max().item() < 1e-3
    rest = (out - reference).abs()
    rest[..., :r1, :c1] = 0
    assert rest.max().item() > 0, f"the other {n_patches - 1} tiles stayed in bf16"


def test_reduced_precision_on_cpu_falls_back_to_fp32(tiny_models, images):
    model, image = tiny_models["edsr_x4"], images["noise_75x97"]
    for precision in ("bf16", "fp16"):
        with pytest.warns(RuntimeWarning, match="only used on CUDA"):
            up = Upscaler(model, precision=precision, device="cpu")
        assert up.dtype == torch.float32
        np.testing.assert_array_equal(up.upscale(image, 4), _quantize(_plain(model, image, 4)))
    assert Upscaler(model, precision="auto", device="cpu").dtype == torch.float32


def test_prepared_copies_are_cached_and_rebuilt_when_weights_change():
    model = EDSR(1, 4, 2)
    cpu = torch.device("cpu")
    first = inference._prepared(model, cpu, torch.bfloat16, False)
    assert first is not model and inference._prepared(model, cpu, torch.bfloat16, False) is first
    assert inference._prepared(model, cpu, torch.float32, False) is model  # nothing to convert
    with torch.no_grad():
        model.head[0].bias.add_(1.0)  # an optimizer step updates in place
    second = inference._prepared(model, cpu, torch.bfloat16, False)
    assert second is not first
    assert torch.equal(second.head[0].bias.float(), model.head[0].bias.to(torch.bfloat16).float())
    assert second.sub_mean.bias.dtype == torch.float32  # the fixed mean shift stays float32


# --------------------------------------------------------------------------------------------------------------------
# Settings and bad input


def test_scale_must_match_the_model(tiny_models, images):
    image = images["noise_75x97"]
    with pytest.raises(ConfigError, match="upscales by 2 only"):
        upscale(tiny_models["edsr_x2"], image, 3)
    with pytest.raises(ConfigError, match=r"\[2, 3, 4\]"):
        upscale(tiny_models["mdsr"], image, None)
    assert upscale(tiny_models["edsr_x2"], image, None).shape == (150, 194, 3)
    assert inference.resolve_scale(tiny_models["mdsr"], 3) == 3


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((8, 8, 3), dtype=np.float32),
        np.zeros((8, 8), dtype=np.uint8),
        np.zeros((8, 8, 4), dtype=np.uint8),
        np.zeros((0, 8, 3), dtype=np.uint8),
        [[1, 2, 3]],
    ],
    ids=["float", "grey-2d", "rgba", "empty", "list"],
)
def test_bad_images_are_clear_errors(tiny_models, bad):
    with pytest.raises(ImageError, match=r"shape|array|empty|list"):
        upscale(tiny_models["edsr_x2"], bad, 2)


def test_bad_settings_are_clear_errors(tiny_models):
    model = tiny_models["edsr_x2"]
    with pytest.raises(ConfigError, match="precision"):
        Upscaler(model, precision="fp8")
    with pytest.raises(ConfigError, match="tile"):
        Upscaler(model, tile=4)
    with pytest.raises(ConfigError, match="tile_batch"):
        Upscaler(model, tile_batch=0)
    with pytest.raises(ConfigError, match="device"):
        Upscaler(model, device="tpu:0")
    with pytest.raises(ConfigError, match=r"\.config"):
        Upscaler(nn.Conv2d(3, 3, 1))


def test_upscaler_from_config_and_call(tiny_models, images):
    model, image = tiny_models["edsr_x2"], images["noise_75x97"]
    up = Upscaler.from_config(model, InferenceConfig(tile=32, self_ensemble=True), device="cpu")
    assert (up.tile, up.self_ensemble, up.dtype) == (32, True, torch.float32)
    np.testing.assert_array_equal(up(image), upscale(model, image, 2, tile=32, self_ensemble=True))
    x = _to_tensor(image)
    assert torch.equal(up(x), upscale_tensor(model, x, 2, tile=32, self_ensemble=True))
    with pytest.raises(ImageError, match="cannot upscale a str"):
        up("photo.png")
    assert "tile=32" in repr(up)


# --------------------------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)


@pytest.mark.gpu
def test_gpu_reduced_precision_is_close_to_fp32(photo):
    torch.manual_seed(5)
    model = edsr_baseline(4).eval()
    image = np.ascontiguousarray(photo[:96, :128])
    fp32 = upscale(model, image, 4, precision="fp32", device="cuda").astype(int)
    np.testing.assert_array_equal(fp32, _quantize(_plain(model, image, 4)))
    for precision in ("bf16", "fp16"):
        out = upscale(model, image, 4, precision=precision, device="cuda").astype(int)
        assert np.abs(out - fp32).mean() < 1.0
        tiled = upscale(model, image, 4, precision=precision, device="cuda", tile=48).astype(int)
        assert np.abs(tiled - out).max() <= 2


@pytest.mark.gpu
def test_gpu_compiled_matches_eager(photo):
    torch.manual_seed(6)
    model = EDSR(4, 32, 2).eval()
    image = np.ascontiguousarray(photo[:64, :64])
    eager = Upscaler(model, device="cuda", precision="fp32").upscale(image).astype(int)
    compiled = Upscaler(model, device="cuda", precision="fp32", compile=True).upscale(image).astype(int)
    assert np.abs(compiled - eager).max() <= 1


def test_models_in_another_pixel_range_get_rescaled_input_and_output(photo):
    # Some forks train in [0, 1] (rgb_range=1): the upscaler feeds such a model x/255 and scales its output back.
    torch.manual_seed(3)
    model = EDSR(n_resblocks=1, n_feats=8, scale=2, rgb_range=1).eval()
    image = np.ascontiguousarray(photo[:40, :56])
    with torch.no_grad():
        expected = model(_to_tensor(image) / 255.0, 2) * 255.0  # written here: the model in its own range
    np.testing.assert_array_equal(upscale(model, image, 2), _quantize(expected))
    np.testing.assert_array_equal(upscale(model, image, 2, tile=16), _quantize(expected))


def test_a_model_that_is_not_rgb_is_refused_clearly():
    with pytest.raises(ConfigError, match=r"1 colour channel\(s\); images are upscaled by RGB models"):
        Upscaler(EDSR(n_resblocks=1, n_feats=8, scale=2, n_colors=1))


def test_an_upscale_stops_between_forward_passes_once_its_caller_gives_up(photo):
    torch.manual_seed(4)
    model = EDSR(n_resblocks=1, n_feats=8, scale=2).eval()
    up = Upscaler(model, tile=16, tile_batch=1)  # one patch per forward pass: many passes
    image = np.ascontiguousarray(photo[:64, :64])
    asked = []

    def gave_up() -> bool:
        asked.append(1)
        return len(asked) > 3  # the caller leaves after three forward passes

    with stop_when(gave_up), pytest.raises(UpscaleCancelled, match=r"stopped after 3 of \d+ patches"):
        up.upscale(image, 2)
    # Outside the block (and on other threads) nothing is checked: the same upscaler finishes normally.
    np.testing.assert_array_equal(up.upscale(image, 2), upscale(model, image, 2))
    assert len(asked) == 4
