"""The per-image work of an evaluation, one code path for the Ray actors and the in-process run.

:class:`ImageEvaluator` reads and decodes one HR/LR pair (:func:`load_pair`: a stored LR must be exactly HR / scale; a
missing one is made with MATLAB-bicubic), upscales it with every column that has its scale through the shared
:class:`~edsr_ray.inference.Upscaler`, and scores it with the paper's quantised PSNR/SSIM (:mod:`edsr_ray.metrics`);
it optionally writes the SR image and a bicubic | model | HR strip for the picture grids. Problems an input causes
become that image's failed results.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from edsr_ray import storage
from edsr_ray.codecs import decode_image, encode_image
from edsr_ray.config import from_dict
from edsr_ray.errors import EdsrRayError, EvaluationError
from edsr_ray.evaluation.report import ImageResult, output_join, safe_name
from edsr_ray.imaging import imresize
from edsr_ray.metrics import psnr, ssim
from edsr_ray.storage import StorageConfig

logger = logging.getLogger(__name__)

# Side (HR pixels) of the centre crops shown in the worst/best picture grids.
GRID_CROP = 120


# Errors an input image can cause while it is evaluated: recorded as that image's failure, the run goes on.
_ITEM_ERRORS = (EdsrRayError, OSError, ValueError)


def _read_rgb(uri: str, cfg: StorageConfig | None) -> np.ndarray:
    img = decode_image(storage.read_bytes(uri, cfg), name=uri)
    if img.bit_depth != 8:
        raise EvaluationError(f"{uri}: a {img.bit_depth}-bit image; the paper's protocol evaluates 8-bit images")
    return img.rgb  # (H, W, 3) uint8; a grey image has three equal channels, as in the official evaluation


def load_pair(item: Mapping[str, Any], cfg: StorageConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(HR, LR) uint8 (H, W, 3) arrays for one work item, the LR one read or generated; sizes are checked.

    A generated LR is ``imresize(hr, 1/scale)`` of the HR image cropped at its bottom/right to a multiple of the scale.
    A stored LR must be exactly (H // scale, W // scale), else EvaluationError naming both files.
    """
    scale = int(item["scale"])
    hr = _read_rgb(str(item["hr_uri"]), cfg)
    h, w = hr.shape[:2]
    if h < scale or w < scale:
        raise EvaluationError(f"{item['hr_uri']}: a {w}x{h} image is smaller than the scale {scale}")
    if not item["lr_uri"]:
        hr = hr[: h - h % scale, : w - w % scale]
        return hr, imresize(hr, 1.0 / scale)
    lr = _read_rgb(str(item["lr_uri"]), cfg)
    if lr.shape[:2] != (h // scale, w // scale):
        raise EvaluationError(
            f"size mismatch: LR {item['lr_uri']} is {lr.shape[1]}x{lr.shape[0]} but HR {item['hr_uri']} is {w}x{h}; "
            f"x{scale} needs LR {w // scale}x{h // scale}"
        )
    return hr, lr


class ImageEvaluator:
    """Ray Data callable class: evaluates work items (one per set, image and scale) with every model that has the
    item's scale, so each image pair is read and decoded once for all the table's columns.

    ``models``: ``{"checkpoint", "scales", "variants": [{"label", "self_ensemble"}]}`` per model, where the checkpoint
    is a dict from :func:`~edsr_ray.weights.model_checkpoint`, a Ray object reference to one, or ``None`` for the
    bicubic baseline. The networks are built once, in ``__init__``. Each input row gives one output row per column
    that has its scale: metrics and timing, or the failure reason.
    """

    def __init__(
        self,
        models: Sequence[Mapping[str, Any]],
        *,
        tile: int | None = None,
        precision: str = "fp32",
        storage_config: Mapping[str, Any] | None = None,
        output: str = "",
        save_images: bool = False,
        pictures: bool = False,
    ):
        from edsr_ray.inference import OUT_OF_MEMORY_ERRORS, Upscaler
        from edsr_ray.weights import load_model

        self._model_errors = (*_ITEM_ERRORS, *OUT_OF_MEMORY_ERRORS)
        self.cfg = from_dict(StorageConfig, storage_config) if storage_config is not None else None
        self.output, self.save_images, self.pictures = output, save_images, pictures
        # (label, scales, upscaler or None for bicubic), in table order.
        self.columns: list[tuple[str, frozenset[int], Any]] = []
        ray = sys.modules.get("ray")
        for m in models:
            checkpoint = m["checkpoint"]
            if ray is not None and isinstance(checkpoint, ray.ObjectRef):  # put in the object store by the driver
                checkpoint = ray.get(checkpoint)
            model = None if checkpoint is None else load_model(checkpoint)
            for v in m["variants"]:
                upscaler = None
                if model is not None:
                    upscaler = Upscaler(model, tile=tile, self_ensemble=bool(v["self_ensemble"]), precision=precision)
                self.columns.append((str(v["label"]), frozenset(int(s) for s in m["scales"]), upscaler))

    def __call__(self, batch: Any) -> Any:
        """pandas DataFrame of work items → pandas DataFrame of :class:`ImageResult` fields."""
        import pandas as pd

        rows = []
        for item in batch.to_dict("records"):
            rows.extend(asdict(r) for r in self.evaluate(item))
        return pd.DataFrame(rows, columns=list(ImageResult.__dataclass_fields__))

    def evaluate(self, item: Mapping[str, Any]) -> list[ImageResult]:
        """Every column with the item's scale on one work item; problems the input causes become failed results."""
        scale, set_name, image = int(item["scale"]), str(item["set"]), str(item["image"])
        columns = [(label, up) for label, scales, up in self.columns if scale in scales]
        try:
            hr, lr = load_pair(item, self.cfg)
        except _ITEM_ERRORS as exc:
            reason = _reason(exc, item)
            logger.warning("%s/%s x%d failed: %s", set_name, image, scale, reason)
            return [ImageResult(label, set_name, scale, image, status="failed", error=reason) for label, _ in columns]
        out = []
        for label, upscaler in columns:
            try:
                out.append(self._one(label, upscaler, hr, lr, item))
            except self._model_errors as exc:
                reason = _reason(exc, item)
                logger.warning("%s on %s/%s x%d failed: %s", label, set_name, image, scale, reason)
                out.append(ImageResult(label, set_name, scale, image, status="failed", error=reason))
        return out

    def _one(self, label: str, upscaler: Any, hr: np.ndarray, lr: np.ndarray, item: Mapping[str, Any]) -> ImageResult:
        scale, protocol = int(item["scale"]), str(item["protocol"])
        start = time.perf_counter()
        sr = imresize(lr, scale) if upscaler is None else upscaler.upscale(lr, scale)  # (h*s, w*s, 3) uint8
        seconds = time.perf_counter() - start
        value_psnr, value_ssim = psnr(sr, hr, scale, protocol), ssim(sr, hr, scale, protocol)
        sr_uri = ""
        if self.save_images:
            sr_uri = output_join(
                self.output,
                "images",
                safe_name(label),
                safe_name(str(item["set"])),
                f"x{scale}",
                f"{safe_name(str(item['image']))}.png",
            )
            storage.write_bytes(sr_uri, encode_image(sr, "png"), self.cfg)
        picture = b""
        if self.pictures and upscaler is not None:  # no grid for the bicubic baseline itself
            from edsr_ray.tracking import comparison_picture

            bicubic = imresize(lr, scale)
            strip = comparison_picture(bicubic, sr, hr[: sr.shape[0], : sr.shape[1]], crop=GRID_CROP)
            picture = encode_image(strip, "jpeg", quality=92)
        return ImageResult(
            model=label,
            set=str(item["set"]),
            scale=scale,
            image=str(item["image"]),
            psnr=value_psnr,
            ssim=value_ssim,
            seconds=seconds,
            sr_uri=sr_uri,
            picture=picture,
        )


def _reason(exc: Exception, item: Mapping[str, Any]) -> str:
    """The failure text for one image, naming its file: the HR file is put in front unless a file is named already."""
    text = str(exc) if isinstance(exc, EdsrRayError) else f"{type(exc).__name__}: {exc}"
    named = any(uri and str(uri) in text for uri in (item["hr_uri"], item["lr_uri"]))
    return text if named else f"{item['hr_uri']}: {text}"
