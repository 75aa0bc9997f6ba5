"""PSNR and SSIM exactly as the paper reports them, so numbers are comparable with its tables.

Two protocols exist, and mixing them up is the usual reason a reproduced PSNR "differs from the paper":

* ``"benchmark"`` (Set5, Set14, B100, Urban100): luma only (ITU-R BT.601 Y), ignoring ``scale`` pixels at each border.
* ``"div2k"``: all three RGB channels, ignoring ``scale + 6`` pixels at each border (the official code's validation).

Both work on 8-bit images: the SR output is quantised first (:func:`quantize`), and the HR image is cropped at its
top-left corner to the SR size (LR size × scale), as the official code does.
"""

from __future__ import annotations

import math
import sys

import numpy as np

PROTOCOLS = ("benchmark", "div2k")

# BT.601 luma weights on 0-255 RGB, divided by 256 as in the paper's evaluation (Y = 16 + the weighted sum).
_Y_WEIGHTS = np.array([65.738, 129.057, 25.064]) / 256.0

# SSIM constants of Wang et al. (2004) for 8-bit data: an 11x11 Gaussian window with sigma 1.5.
_SSIM_SIGMA = 1.5
_SSIM_RADIUS = 5
_SSIM_C1 = (0.01 * 255) ** 2
_SSIM_C2 = (0.03 * 255) ** 2


def _is_torch_tensor(x: object) -> bool:
    # Checked through sys.modules so this module never imports torch itself: if torch is not loaded, x is no tensor.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def quantize(img, rgb_range: float = 255) -> np.ndarray:
    """Quantise a model output to 8 bit as the official evaluation does: × 255 / rgb_range, clamp to [0, 255], round.

    ``img`` is a float numpy array in HWC (or HW) layout, or a torch tensor in CHW or BCHW layout (on any device; it
    is quantised there and only the uint8 result is copied). Returns a uint8 numpy array in HWC (or BHWC) layout.
    Rounding is half-to-even, like ``torch.round``.
    """
    factor = 255.0 / float(rgb_range)
    if _is_torch_tensor(img):
        if img.dim() not in (3, 4):
            raise ValueError(f"quantize expects a CHW or BCHW tensor, got shape {tuple(img.shape)}")
        import torch  # already loaded: img is a tensor

        q = img.detach().float().mul(factor).clamp(0, 255).round().to(torch.uint8)
        q = q.movedim(-3, -1)  # (..., C, H, W) -> (..., H, W, C)
        return q.cpu().numpy()
    arr = np.asarray(img)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"quantize expects a real-valued array, got dtype {arr.dtype}")
    if arr.dtype == np.uint8 and factor == 1.0:
        return arr
    return np.round(np.clip(arr.astype(np.float64) * factor, 0, 255)).astype(np.uint8)


def _check_pair(sr: np.ndarray, hr: np.ndarray, scale: int, protocol: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Validate inputs; return sr, hr cropped to sr's size, and the border to ignore."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    if isinstance(scale, bool) or int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    scale = int(scale)
    sr, hr = np.asarray(sr), np.asarray(hr)
    for label, arr in (("sr", sr), ("hr", hr)):
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(
                f"{label} must be an (H, W, 3) uint8 image (quantize model outputs first), "
                f"got shape {arr.shape} dtype {arr.dtype}"
            )
    (sh, sw), (hh, hw) = sr.shape[:2], hr.shape[:2]
    # The SR image is LR size × scale, and the LR image was made from HR cropped to a multiple of the scale, so
    # the HR image may exceed the SR image by less than one LR pixel, never be smaller.
    if not (0 <= hh - sh < scale and 0 <= hw - sw < scale):
        raise ValueError(
            f"sr is {sh}x{sw} but hr is {hh}x{hw}: for scale {scale} hr must be the same size or larger by less "
            "than the scale (wrong scale, or images that do not belong together?)"
        )
    border = scale if protocol == "benchmark" else scale + 6
    if sh <= 2 * border or sw <= 2 * border:
        raise ValueError(f"a {sh}x{sw} image leaves nothing to compare after ignoring {border} border pixels")
    return sr, hr[:sh, :sw], border


def psnr(sr: np.ndarray, hr: np.ndarray, scale: int, protocol: str = "benchmark") -> float:
    """Peak signal-to-noise ratio in dB between uint8 (H, W, 3) images under the paper's protocol.

    MSE is taken on values scaled to [0, 1] (peak 1): of the Y channel of the difference for ``"benchmark"``
    (the +16 offset cancels in a difference), of all RGB values for ``"div2k"``. Identical images give ``math.inf``.
    """
    sr, hr, border = _check_pair(sr, hr, scale, protocol)
    diff = (sr.astype(np.float64) - hr.astype(np.float64)) / 255.0  # (H, W, 3)
    if protocol == "benchmark":
        diff = diff @ _Y_WEIGHTS  # (H, W)
    valid = diff[border:-border, border:-border]
    mse = float(np.mean(valid * valid))
    return math.inf if mse == 0 else -10.0 * math.log10(mse)


def _gaussian_window() -> np.ndarray:
    offsets = np.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, dtype=np.float64)
    window = np.exp(-(offsets**2) / (2 * _SSIM_SIGMA**2))
    return window / window.sum()


def _filter_valid(img: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Separable 2-D filtering keeping only positions where the whole window fits ('valid' convolution)."""
    n = window.size
    rows = sum(w * img[i : img.shape[0] - n + 1 + i] for i, w in enumerate(window))  # (H-n+1, W)
    return sum(w * rows[:, i : rows.shape[1] - n + 1 + i] for i, w in enumerate(window))  # (H-n+1, W-n+1)


def _ssim_map_mean(x: np.ndarray, y: np.ndarray) -> float:
    """Mean SSIM of two float images in the 0-255 range (Wang et al. 2004, Gaussian window, population statistics)."""
    window = _gaussian_window()
    mu_x, mu_y = _filter_valid(x, window), _filter_valid(y, window)
    var_x = _filter_valid(x * x, window) - mu_x * mu_x
    var_y = _filter_valid(y * y, window) - mu_y * mu_y
    cov = _filter_valid(x * y, window) - mu_x * mu_y
    num = (2 * mu_x * mu_y + _SSIM_C1) * (2 * cov + _SSIM_C2)
    den = (mu_x * mu_x + mu_y * mu_y + _SSIM_C1) * (var_x + var_y + _SSIM_C2)
    return float(np.mean(num / den))


def ssim(sr: np.ndarray, hr: np.ndarray, scale: int, protocol: str = "benchmark") -> float:
    """Structural similarity between uint8 (H, W, 3) images on the Y channel (16 + BT.601 luma, 0-255 range).

    SSIM is computed on Y for both protocols, as in the paper's tables (DIV2K numbers included); the protocol only
    sets the border: ``scale`` for ``"benchmark"``, ``scale + 6`` for ``"div2k"``. The 11x11 Gaussian window
    (sigma 1.5) is applied where it fits inside the cropped image, as MATLAB's reference ``ssim_index`` does.
    """
    sr, hr, border = _check_pair(sr, hr, scale, protocol)
    if min(sr.shape[0], sr.shape[1]) - 2 * border < 2 * _SSIM_RADIUS + 1:
        raise ValueError(
            f"a {sr.shape[0]}x{sr.shape[1]} image is too small for an 11x11 SSIM window after ignoring "
            f"{border} border pixels"
        )
    y_sr = 16.0 + sr.astype(np.float64) @ _Y_WEIGHTS  # (H, W)
    y_hr = 16.0 + hr.astype(np.float64) @ _Y_WEIGHTS
    crop = (slice(border, -border), slice(border, -border))
    return _ssim_map_mean(y_sr[crop], y_hr[crop])
