"""Tests for edsr_ray.imaging: MATLAB bicubic against hand-derived weights and a per-pixel reference written here,
Pillow's float bicubic in the interior, and the BT.601 luma against scikit-image."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from edsr_ray.errors import ImageError
from edsr_ray.imaging import imresize, rgb_to_y


@pytest.fixture(scope="module")
def coffee(photos) -> np.ndarray:
    return photos["coffee"]


def _keys_cubic(d: float) -> float:
    """Keys' cubic kernel, a = -0.5."""
    d = abs(d)
    if d <= 1:
        return 1.5 * d**3 - 2.5 * d**2 + 1
    if d <= 2:
        return -0.5 * d**3 + 2.5 * d**2 - 4 * d + 2
    return 0.0


def _reflect(k: int, n: int) -> int:
    """1-based index k reflected into 1..n with the edge sample repeated; returned 0-based."""
    while k < 1 or k > n:
        k = 1 - k if k < 1 else 2 * n + 1 - k
    return k - 1


def _reference_line(line: list[float], out_len: int, scale: float) -> list[float]:
    """One output sample at a time, straight from MATLAB's formulas."""
    n = len(line)
    width = 4 / scale if scale < 1 else 4
    out = []
    for x in range(1, out_len + 1):
        u = x / scale + 0.5 * (1 - 1 / scale)
        total = weight_sum = 0.0
        for k in range(math.floor(u - width / 2), math.floor(u - width / 2) + math.ceil(width) + 2):
            w = scale * _keys_cubic(scale * (u - k)) if scale < 1 else _keys_cubic(u - k)
            total += w * line[_reflect(k, n)]
            weight_sum += w
        out.append(total / weight_sum)
    return out


def _reference_imresize(img: np.ndarray, out_shape: tuple[int, int], scales: tuple[float, float]) -> np.ndarray:
    """Per-pixel reference: resize the axis with the smaller factor first, storing each pass as uint8 (MATLAB)."""
    cur = img.astype(np.float64)
    for axis in sorted((0, 1), key=lambda a: scales[a]):
        moved = np.moveaxis(cur, axis, 0)  # (L, other, C)
        res = np.empty((out_shape[axis], *moved.shape[1:]))
        for j in range(moved.shape[1]):
            for c in range(moved.shape[2]):
                res[:, j, c] = _reference_line(list(moved[:, j, c]), out_shape[axis], scales[axis])
        res = np.array([[[min(255, max(0, math.floor(v + 0.5))) for v in px] for px in row] for row in res])
        cur = np.moveaxis(res, 0, axis)
    return cur.astype(np.uint8)


def test_upscale_x2_uses_the_cubic_weights_derived_by_hand():
    # For x2 the sampling positions sit 1/4 pixel from the input samples: weights (-3, 29, 111, -9) / 128 from the
    # kernel at distances 1.75, 0.75, 0.25, 1.25; positions past the ends reflect with the edge sample repeated.
    s = np.array([10.0, 200.0, 30.0, 90.0, 250.0, 0.0])
    n = len(s)

    def at(i: int) -> float:  # 0-based, reflected with the edge sample repeated
        return s[-i - 1] if i < 0 else s[2 * n - 1 - i] if i >= n else s[i]

    expected = []
    for j in range(2 * n):
        m = j // 2
        even = {m - 2: -3, m - 1: 29, m: 111, m + 1: -9}
        odd = {m - 1: -9, m: 111, m + 1: 29, m + 2: -3}
        taps = even if j % 2 == 0 else odd
        expected.append(sum(w * at(i) for i, w in taps.items()) / 128)
    out = imresize(s[None, :], 2)
    assert out.shape == (2, 12)
    np.testing.assert_allclose(out, np.array([expected, expected]), rtol=0, atol=1e-12)


def test_antialiased_downscale_by_2_uses_the_stretched_kernel():
    # Shrinking by 2 stretches the kernel to width 8: output j sits between inputs 2j and 2j+1 and takes eight taps
    # with weights (-3, -9, 29, 111, 111, 29, -9, -3) / 256.
    s = np.array([5.0, 80.0, 140.0, 20.0, 255.0, 60.0, 0.0, 120.0])
    n = len(s)

    def at(i: int) -> float:
        return s[-i - 1] if i < 0 else s[2 * n - 1 - i] if i >= n else s[i]

    weights = (-3, -9, 29, 111, 111, 29, -9, -3)
    expected = [sum(w * at(2 * j - 3 + t) for t, w in enumerate(weights)) / 256 for j in range(n // 2)]
    out = imresize(s[:, None], 0.5)
    assert out.shape == (4, 1)
    np.testing.assert_allclose(out[:, 0], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", [0.25, 1 / 3, 0.5, 2, 3, 4])
def test_constant_image_stays_constant(scale):
    img = np.full((13, 17, 3), 77, np.uint8)
    out = imresize(img, scale)
    assert out.shape == (math.ceil(13 * scale), math.ceil(17 * scale), 3)
    assert out.dtype == np.uint8
    assert np.all(out == 77)
    flat = imresize(np.full((9, 10), 0.3), scale)
    np.testing.assert_allclose(flat, 0.3, atol=1e-12)


def test_output_size_follows_matlab():
    img = np.zeros((10, 11), np.uint8)
    assert imresize(img, 0.5).shape == (5, 6)  # ceil(5.5)
    assert imresize(img, 1 / 3).shape == (4, 4)
    assert imresize(img, (2, 0.5)).shape == (20, 6)
    assert imresize(img, output_shape=(7, 3)).shape == (7, 3)
    assert imresize(np.zeros((2040, 1356, 3), np.uint8)[:12, :12], 1 / 4).shape == (3, 3, 3)


@pytest.mark.parametrize(
    ("scale", "output_shape"),
    [(0.5, None), (1 / 3, None), (0.25, None), (2, None), (3, None), ((0.75, 0.5), None), (None, (17, 29))],
)
def test_matches_per_pixel_reference_on_a_photo(coffee, scale, output_shape):
    crop = coffee[150:186, 200:244]  # (36, 44, 3), a textured region
    out = imresize(crop, scale, output_shape=output_shape)
    if output_shape is None:
        factors = (scale, scale) if np.isscalar(scale) else scale
        shape = (math.ceil(36 * factors[0]), math.ceil(44 * factors[1]))
    else:
        shape = output_shape
        factors = (shape[0] / 36, shape[1] / 44)
    expected = _reference_imresize(crop, shape, factors)
    assert out.shape == expected.shape
    diff = np.abs(out.astype(int) - expected.astype(int))
    assert diff.max() <= 1
    assert np.mean(diff == 0) > 0.99


def test_interior_matches_pillow_float_bicubic_but_borders_reflect(coffee):
    # Pillow's bicubic has the same kernel, centre mapping and antialiasing, but renormalises a truncated kernel at
    # the borders instead of reflecting. Away from the borders both must agree.
    grey = coffee[:120, :150, 1].astype(np.float32)
    ours = imresize(grey, 1 / 3)
    pillow = np.asarray(Image.fromarray(grey, mode="F").resize((50, 40), Image.Resampling.BICUBIC, reducing_gap=None))
    np.testing.assert_allclose(ours[3:-3, 3:-3], pillow[3:-3, 3:-3], atol=2e-3)
    assert np.max(np.abs(ours[0] - pillow[0])) > 0.05  # the border rule really is different


def test_dtypes_and_overshoot(coffee):
    step = np.zeros((8, 8)) + (np.arange(8) >= 4)  # a hard edge overshoots with a = -0.5 when enlarged
    up = imresize(step, 4)
    assert up.dtype == np.float64 and up.min() < -0.01 and up.max() > 1.01
    up32 = imresize(step.astype(np.float32), 2)
    assert up32.dtype == np.float32
    img16 = coffee[:40, :40].astype(np.uint16) * 257
    down16 = imresize(img16, 0.5)
    assert down16.dtype == np.uint16
    # 16-bit results divided back to 8 bit agree with the 8-bit resize up to rounding.
    assert np.max(np.abs(down16 / 257.0 - imresize(coffee[:40, :40], 0.5))) <= 1.0


def test_down_up_round_trip_psnr_is_typical(coffee):
    hr = coffee[:396, :600]

    def psnr(a: np.ndarray) -> float:
        return 10 * math.log10(255.0**2 / np.mean((a.astype(np.float64) - hr) ** 2))

    value = psnr(imresize(imresize(hr, 0.5), 2))
    assert 28 < value < 38
    # Dropping the antialiasing (plain subsampling) must do worse on a real photo.
    assert psnr(imresize(hr[::2, ::2], 2)) < value


def test_imresize_rejects_bad_arguments():
    img = np.zeros((4, 4), np.uint8)
    with pytest.raises(ValueError, match="exactly one"):
        imresize(img)
    with pytest.raises(ValueError, match="exactly one"):
        imresize(img, 2, output_shape=(8, 8))
    with pytest.raises(ValueError, match="positive"):
        imresize(img, -2)
    with pytest.raises(ImageError, match="int32"):
        imresize(img.astype(np.int32), 2)
    with pytest.raises(ImageError, match="shape"):
        imresize(np.zeros((2, 2, 2, 2)), 2)


def test_rgb_to_y_known_values_and_skimage(coffee):
    corners = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0]]], np.uint8)
    y = rgb_to_y(corners)
    np.testing.assert_allclose(y[0], [16, 16 + 219.859 * 255 / 256, 16 + 65.738 * 255 / 256], atol=1e-9)
    from skimage.color import rgb2ycbcr

    np.testing.assert_allclose(rgb_to_y(coffee), rgb2ycbcr(coffee)[..., 0], atol=2e-3)
    with pytest.raises(ImageError):
        rgb_to_y(coffee[..., 0])
