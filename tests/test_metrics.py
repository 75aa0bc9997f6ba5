"""Tests for edsr_ray.metrics: PSNR and SSIM equal scikit-image's on the same crops, for both protocols."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from edsr_ray.imaging import imresize
from edsr_ray.metrics import psnr, quantize, ssim


def _bicubic_sr(hr: np.ndarray, scale: int) -> np.ndarray:
    """A realistic SR stand-in: the photo shrunk with MATLAB bicubic and enlarged again."""
    return imresize(imresize(hr, 1 / scale), scale)


@pytest.fixture(scope="module")
def pairs(photos) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(scale, sr, hr) on crops of three real photos, HR cut to a multiple of the scale."""
    out = []
    for name in ("coffee", "chelsea", "astronaut"):
        photo = photos[name][:150, :200]
        for scale in (2, 3, 4):
            hr = photo[: photo.shape[0] // scale * scale, : photo.shape[1] // scale * scale]
            out.append((scale, _bicubic_sr(hr, scale), hr))
    return out


def _skimage_y(img: np.ndarray) -> np.ndarray:
    return rgb2ycbcr(img)[..., 0]  # BT.601 Y in [16, 235] for uint8 input


def test_psnr_equals_skimage_both_protocols(pairs):
    for scale, sr, hr in pairs:
        b = scale
        expected = peak_signal_noise_ratio(_skimage_y(hr)[b:-b, b:-b], _skimage_y(sr)[b:-b, b:-b], data_range=255)
        assert abs(psnr(sr, hr, scale) - expected) <= 1e-3
        b = scale + 6
        expected = peak_signal_noise_ratio(hr[b:-b, b:-b], sr[b:-b, b:-b], data_range=255)
        assert abs(psnr(sr, hr, scale, protocol="div2k") - expected) <= 1e-3
        # Sanity: bicubic reconstruction of a photo is in the usual range and gets worse with the scale.
        assert 18 < psnr(sr, hr, scale) < 45


def test_ssim_equals_skimage_both_protocols(pairs):
    for scale, sr, hr in pairs:
        for protocol, b in (("benchmark", scale), ("div2k", scale + 6)):
            expected = structural_similarity(
                _skimage_y(hr)[b:-b, b:-b],
                _skimage_y(sr)[b:-b, b:-b],
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
                data_range=255,
            )
            value = ssim(sr, hr, scale, protocol=protocol)
            assert abs(value - expected) <= 1e-4
            assert 0.3 < value < 1


def test_psnr_by_hand():
    hr = np.full((20, 24, 3), 100, np.uint8)
    sr = hr + np.uint8(1)
    # RGB: every value off by 1/255.
    assert psnr(sr, hr, 2, protocol="div2k") == pytest.approx(20 * math.log10(255), abs=1e-9)
    # Y of the difference: (65.738 + 129.057 + 25.064) / 256 / 255 per pixel.
    y = (65.738 + 129.057 + 25.064) / 256 / 255
    assert psnr(sr, hr, 2) == pytest.approx(-20 * math.log10(y), abs=1e-9)
    # Only the border differs: ignored by both protocols.
    edged = hr.copy()
    edged[:3] = 0
    assert psnr(edged, hr, 3) == math.inf
    assert psnr(edged, hr, 2) < 40


def test_identical_images(pairs):
    hr = pairs[0][2]
    assert psnr(hr, hr, 2) == math.inf
    assert psnr(hr, hr, 2, protocol="div2k") == math.inf
    assert ssim(hr, hr, 2) == pytest.approx(1.0, abs=1e-12)


def test_hr_is_cropped_top_left_to_sr_size(photos):
    photo = photos["coffee"][:151, :203]  # not a multiple of 3
    hr = photo[:150, :201]
    sr = _bicubic_sr(hr, 3)
    assert psnr(sr, photo, 3) == psnr(sr, hr, 3)
    assert ssim(sr, photo, 3, protocol="div2k") == ssim(sr, hr, 3, protocol="div2k")


def test_bad_arguments(pairs):
    scale, sr, hr = pairs[0]
    with pytest.raises(ValueError, match="'set5'"):
        psnr(sr, hr, scale, protocol="set5")
    with pytest.raises(ValueError, match="'y'"):
        ssim(sr, hr, scale, protocol="y")
    with pytest.raises(ValueError, match=r"sr is .* but hr is"):
        psnr(sr, hr[:-1], scale)  # sr larger than hr
    with pytest.raises(ValueError, match=r"sr is .* but hr is"):
        psnr(sr[: -2 * scale], hr, scale)  # hr far larger: the wrong pair or the wrong scale
    with pytest.raises(ValueError, match="quantize"):
        psnr(sr.astype(np.float32), hr, scale)
    with pytest.raises(ValueError, match="positive integer"):
        psnr(sr, hr, 0)
    with pytest.raises(ValueError, match="nothing to compare"):
        psnr(sr[:8, :8], hr[:8, :8], 4)
    with pytest.raises(ValueError, match="too small"):
        ssim(sr[:18, :18], hr[:18, :18], 4)  # 10x10 left after the border


def test_quantize_numpy():
    x = np.array([[[-3.0, 0.4, 2.5], [3.5, 254.6, 300.0]]])
    np.testing.assert_array_equal(quantize(x), [[[0, 0, 2], [4, 255, 255]]])  # half to even, clamped
    np.testing.assert_array_equal(quantize(x / 255, rgb_range=1), quantize(x))
    u8 = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    assert quantize(u8) is u8


def test_quantize_torch_matches_official_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 5, 7, generator=g) * 280 - 10  # (B, C, H, W), slightly out of range on both sides
    # The official evaluation: mul(255 / rgb_range), clamp(0, 255), round; then HWC for writing.
    official = x.mul(1.0).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = quantize(x)
    assert out.dtype == np.uint8 and out.shape == (2, 5, 7, 3)
    np.testing.assert_array_equal(out, official)
    np.testing.assert_array_equal(quantize(x[1]), official[1])  # (C, H, W) -> (H, W, C)
    np.testing.assert_array_equal(quantize(x / 255, rgb_range=1), official)
    with pytest.raises(ValueError, match="CHW"):
        quantize(x[0, 0])
