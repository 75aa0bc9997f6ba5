"""The small DIV2K-layout sample dataset the data and training tests share: where it is ingested, a data config
for it, and the alignment check of an LR/HR patch pair against an independent resize."""

from __future__ import annotations

import numpy as np

from edsr_ray.config import DataConfig
from edsr_ray.imaging import imresize

ROOT = "s3://edsr/data-tests/div2k"


def data_config(**overrides) -> DataConfig:
    values = dict(root=ROOT, patch_size=24, patches_per_image=16, epoch_patches=192)
    values.update(overrides)
    return DataConfig(**values)


def max_interior_error(lr: np.ndarray, hr: np.ndarray, scale: int, margin: int = 3) -> int:
    """How far ``imresize(hr, 1/scale)`` is from ``lr``, away from the patch border.

    The border is skipped because the bicubic kernel, stretched to 4*scale HR pixels when shrinking, reaches two LR
    pixels beyond the patch: near its edges the stored LR saw image content the crop no longer has (imresize
    mirrors the crop instead). Both axis orders are tried because imresize rounds (and clips) to uint8 between its
    two 1-D passes, rows first: a transposed patch was resized columns first, which can differ by a few grey levels
    near saturated pixels. Flips commute with the resize exactly.
    """
    inner = (slice(margin, -margin), slice(margin, -margin))
    as_stored = np.abs(imresize(hr, 1 / scale).astype(int) - lr)[inner].max()
    transposed = np.abs(imresize(hr.swapaxes(0, 1), 1 / scale).swapaxes(0, 1).astype(int) - lr)[inner].max()
    return int(min(as_stored, transposed))
