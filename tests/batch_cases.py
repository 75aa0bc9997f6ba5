"""What the batch upscaling tests share: crops of real photos, the output the job must write for an input (the shared
inference path on the same decoded image), and the environment of a job run as a program."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from edsr_ray.codecs import DecodedImage, decode_image
from edsr_ray.inference import upscale, upscale_decoded


def crop(photos, name: str, h: int, w: int, top: int = 0) -> np.ndarray:
    return np.ascontiguousarray(photos[name][top : top + h, :w])


def grey(photos, name: str, h: int, w: int) -> np.ndarray:
    return crop(photos, name, h, w).mean(axis=2).round().astype(np.uint8)  # (h, w)


def expected_output(model, data: bytes) -> DecodedImage:
    """What the job must write for an input: the shared inference path on the same decoded image."""
    source = decode_image(data)
    if source.bit_depth == 8 and not source.grey and source.alpha is None:
        return DecodedImage(upscale(model, source.rgb, 2), None, 8, False)
    return upscale_decoded(model, source, 2)


def assert_same_image(result: DecodedImage, expected: DecodedImage, key: str) -> None:
    assert result.rgb.shape == expected.rgb.shape, key
    assert result.bit_depth == expected.bit_depth and result.grey == expected.grey, key
    np.testing.assert_array_equal(result.rgb, expected.rgb, err_msg=key)
    assert (result.alpha is None) == (expected.alpha is None), key
    if expected.alpha is not None:
        np.testing.assert_array_equal(result.alpha, expected.alpha, err_msg=key)


def job_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **extra}


def lossy(array: np.ndarray, fmt: str) -> bytes:
    """``array`` encoded by Pillow as a JPEG or WebP at quality 95."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, quality=95)
    return buffer.getvalue()
