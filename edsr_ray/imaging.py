"""Pixel arithmetic the paper's numbers depend on: MATLAB-compatible bicubic resizing and the BT.601 luma.

* :func:`imresize` reproduces MATLAB's ``imresize(img, scale, 'bicubic')``, the function that made DIV2K's LR images
  and every benchmark LR set. PIL's bicubic uses another kernel support and no such antialiasing, so models trained or
  evaluated on PIL-made LR images do not reproduce the paper's numbers.
* :func:`rgb_to_y` is the ITU-R BT.601 luma used by the paper's evaluation.

Reading and writing image files is :mod:`edsr_ray.codecs`.
"""

from __future__ import annotations

import math

import numpy as np

from edsr_ray.errors import ImageError


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's 'bicubic'), support [-2, 2]."""
    ax = np.abs(x)
    ax2 = ax * ax
    ax3 = ax2 * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return near + far


def _contributions(in_len: int, out_len: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Weights and 0-based source indices, both (out_len, taps), for resizing one axis.

    Follows MATLAB's definition: output pixel x (1-based) samples input position u = x/scale + 0.5·(1 - 1/scale);
    when shrinking, the kernel is stretched by 1/scale (and scaled down) so it also low-passes (antialiasing);
    weights are normalised to sum 1; indices outside the image are mirrored (half-sample symmetric, the edge pixel
    repeated); taps whose weight is zero for every output pixel are dropped.
    """
    if scale < 1.0:

        def kernel(d: np.ndarray) -> np.ndarray:
            return scale * _cubic(scale * d)

        width = 4.0 / scale
    else:
        kernel = _cubic
        width = 4.0
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - width / 2.0)
    taps = math.ceil(width) + 2
    idx = left[:, None] + np.arange(taps, dtype=np.float64)  # (out_len, taps), 1-based like MATLAB
    weights = kernel(u[:, None] - idx)
    weights /= weights.sum(axis=1, keepdims=True)
    # Mirror into [1, in_len]: the sequence 1..n, n..1 repeated (MATLAB's aux = [1:n, n:-1:1]).
    period = 2 * in_len
    m = np.mod(idx.astype(np.int64) - 1, period)
    indices = np.where(m < in_len, m, period - 1 - m)
    keep = np.any(weights != 0, axis=0)
    return weights[:, keep], indices[:, keep]


def _resize_axis(x: np.ndarray, axis: int, weights: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Weighted gather along one axis: out[i] = sum_p weights[i, p] * x[indices[i, p]] (float64)."""
    bshape = [1] * x.ndim
    bshape[axis] = -1
    out = None
    # One pass per tap keeps memory at two output-sized buffers, instead of a (out, taps, ...) gather.
    for p in range(weights.shape[1]):
        term = np.take(x, indices[:, p], axis=axis) * weights[:, p].reshape(bshape)
        if out is None:
            out = term
        else:
            out += term
    return out


def _round_to_integer_range(x: np.ndarray, max_value: int) -> np.ndarray:
    """Saturate and round half away from zero, as MATLAB does when storing a double into uint8/uint16."""
    np.clip(x, 0, max_value, out=x)
    x += 0.5
    np.floor(x, out=x)
    return x


def imresize(
    image: np.ndarray,
    scale: float | tuple[float, float] | None = None,
    *,
    output_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """Resize like MATLAB's ``imresize(image, scale)`` with the default bicubic method and antialiasing.

    Give either ``scale`` (a number, or (row, column) factors; output size is ceil(in × scale) as in MATLAB) or
    ``output_shape`` (rows, columns; the factors are then out / in). ``image`` is (H, W) or (H, W, C).

    uint8 and uint16 images come back in the same dtype: MATLAB stores the result of each 1-D pass in the input
    class, so the pass along the first axis is rounded and clipped before the second one, and so is this. Float
    images are computed in float64 and returned in their own dtype, unclipped (bicubic overshoots slightly).
    The axis with the smaller factor is resized first (MATLAB's order; rows first on ties).
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ImageError(f"imresize expects an (H, W) or (H, W, C) array, got shape {image.shape}")
    if image.dtype == np.uint8 or image.dtype == np.uint16:
        max_value: int | None = int(np.iinfo(image.dtype).max)
    elif np.issubdtype(image.dtype, np.floating):
        max_value = None
    else:
        raise ImageError(f"imresize supports uint8, uint16 and float images, got dtype {image.dtype}")
    in_shape = image.shape[:2]
    if min(in_shape) < 1:
        raise ImageError(f"imresize got an empty image of shape {image.shape}")

    if (scale is None) == (output_shape is None):
        raise ValueError("imresize needs exactly one of scale or output_shape")
    if scale is not None:
        factors = (float(scale), float(scale)) if np.isscalar(scale) else tuple(float(s) for s in scale)
        if len(factors) != 2 or not all(math.isfinite(s) and s > 0 for s in factors):
            raise ValueError(f"imresize scale must be a positive number or a (rows, cols) pair, got {scale!r}")
        out_shape = tuple(math.ceil(f * n) for f, n in zip(factors, in_shape))
    else:
        out_shape = tuple(int(n) for n in output_shape)
        if len(out_shape) != 2 or min(out_shape) < 1:
            raise ValueError(f"imresize output_shape must be two positive sizes, got {output_shape!r}")
        factors = tuple(o / n for o, n in zip(out_shape, in_shape))

    order = sorted((0, 1), key=lambda axis: factors[axis])  # stable: rows first on ties, like MATLAB's sort
    out = image  # the first pass gathers from the input directly; its products are float64
    for axis in order:
        if out_shape[axis] == in_shape[axis] and factors[axis] == 1.0:
            continue  # identity weights; MATLAB takes a pure-indexing shortcut here
        weights, indices = _contributions(in_shape[axis], out_shape[axis], factors[axis])
        out = _resize_axis(out, axis, weights, indices)
        if max_value is not None:
            out = _round_to_integer_range(out, max_value)
    return out.astype(image.dtype)


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """Luma Y = 16 + (65.738 R + 129.057 G + 25.064 B) / 256 as float64 (H, W), for RGB in the 0-255 range.

    This is ITU-R BT.601 studio-swing luma (Y in [16, 235]), MATLAB's ``rgb2ycbcr`` applied to uint8 images, as used
    by the paper's evaluation and by every SR benchmark table since SRCNN.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(f"rgb_to_y expects an (H, W, 3) RGB array, got shape {image.shape}")
    if image.dtype == np.uint16:
        raise ImageError("rgb_to_y expects values in the 0-255 range; reduce uint16 images to 8 bit first")
    rgb = image.astype(np.float64)
    return 16.0 + (65.738 * rgb[..., 0] + 129.057 * rgb[..., 1] + 25.064 * rgb[..., 2]) / 256.0
