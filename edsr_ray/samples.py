"""Real sample photos shipped inside scikit-image, used by the quickstart, the tests and the benchmarks.

They are read straight from the package's data folder (no network), so a fresh machine has real photographic content
to ingest and train on without downloading DIV2K.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from edsr_ray.errors import EdsrRayError

# Colour photographs (not drawings or microscopy renderings), largest first.
PHOTOS = (
    "retina.jpg",
    "hubble_deep_field.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "rocket.jpg",
    "coffee.png",
    "astronaut.png",
    "ihc.png",
    "chelsea.png",
)


def data_dir() -> Path:
    """scikit-image's bundled data folder (raises a clear error when scikit-image is not installed)."""
    try:
        import skimage
    except ImportError:
        raise EdsrRayError(
            "the sample photos come from scikit-image, which is not installed: pip install scikit-image"
        ) from None
    return Path(skimage.__file__).parent / "data"


def photo_bytes(name: str) -> bytes:
    """Encoded bytes of one bundled photo (e.g. ``"coffee.png"``)."""
    path = data_dir() / name
    if not path.is_file():
        raise EdsrRayError(f"sample photo {name!r} is not in {data_dir()}")
    return path.read_bytes()


def photo(name: str) -> np.ndarray:
    """One bundled photo as an (H, W, 3) uint8 RGB array."""
    with Image.open(io.BytesIO(photo_bytes(name))) as im:
        return np.asarray(im.convert("RGB"))


def photos(names: tuple[str, ...] = PHOTOS) -> dict[str, np.ndarray]:
    """Several bundled photos, keyed by file stem."""
    return {Path(n).stem: photo(n) for n in names}
