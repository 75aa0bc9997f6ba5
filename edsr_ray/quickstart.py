"""The quickstart: the whole system on one machine, end to end, in a few minutes on a CPU.

It starts the embedded S3 server, ingests a small DIV2K-layout set built from real photos that ship with scikit-image
(some kept for validation only), trains a small EDSR with two Ray Train workers fed by the Ray Data patch stream,
tracks the run in MLflow (sqlite) and registers the model. Its S3 data lives in the project home's ``quickstart/``
(:func:`edsr_ray.home.quickstart_dir`), the MLflow store in its ``mlflow/``; each quickstart is a new run.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edsr_ray import home, samples, tracking
from edsr_ray.codecs import encode_image
from edsr_ray.config import ExperimentConfig, load_config
from edsr_ray.infra.ray import ensure_ray, quiet_environment, stop_ray

log = logging.getLogger(__name__)

# Photos for training and photos kept apart for validation (different scenes: nothing leaks between the two).
TRAIN_PHOTOS = ("motorcycle_left.png", "rocket.jpg", "astronaut.png", "ihc.png", "retina.jpg", "hubble_deep_field.jpg")
VALID_PHOTOS = ("coffee.png", "chelsea.png")
BUCKET = "edsr"


@dataclass
class QuickstartResult:
    psnr: float
    bicubic_psnr: float
    steps: int
    registered: dict[str, str]
    tracking_uri: str
    s3_endpoint: str


def build_sample_set(folder: Path) -> list[Path]:
    """Write the sample photos as a DIV2K-layout HR set (0001.png... for training, 0801.png... for validation).

    Images are cropped to a multiple of 12 pixels, as DIV2K's are, so every scale divides them exactly.
    """
    written = []
    for split, names, first in (("train", TRAIN_PHOTOS, 1), ("valid", VALID_PHOTOS, 801)):
        out = folder / f"DIV2K_{split}_HR"
        out.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(names):
            img = samples.photo(name)
            h, w = img.shape[0] // 12 * 12, img.shape[1] // 12 * 12
            path = out / f"{first + i:04d}.png"
            path.write_bytes(encode_image(np.ascontiguousarray(img[:h, :w])))
            written.append(path)
    return written


def quickstart_config(config_path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The quickstart config with the data and run locations of the embedded services filled in.

    Each quickstart is a new run (its name carries the time), so a second quickstart trains again instead of resuming
    a finished run; ``run.name=...`` on the command line resumes a given one.
    """
    import time

    defaults = [
        f"data.root=s3://{BUCKET}/quickstart",
        f"run.storage_path=s3://{BUCKET}/runs",
        f"run.name=quickstart-{time.strftime('%Y%m%d-%H%M%S')}",
    ]
    return load_config(config_path, [*defaults, *overrides])


def run_quickstart(config_path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> QuickstartResult:
    """Start the embedded services, ingest, train, register; returns the validation PSNR against bicubic."""
    from edsr_ray.infra.objectstore import EmbeddedS3
    from edsr_ray.ingest import ingest
    from edsr_ray.training.run import run_training

    cfg = quickstart_config(config_path, overrides)  # config errors before any service starts
    folder = home.quickstart_dir()
    folder.mkdir(parents=True, exist_ok=True)
    quiet_environment()
    with EmbeddedS3(folder / "s3", buckets=(BUCKET,)) as s3:
        os.environ.update(s3.env())  # the driver, Ray's workers (started below) and pyarrow all read these
        log.info("embedded S3 server at %s (data in %s)", s3.endpoint_url, folder / "s3")
        with tempfile.TemporaryDirectory(prefix="edsr-quickstart-") as tmp:
            build_sample_set(Path(tmp))
            # A private local Ray, even when this machine runs others. Two Ray Train workers take a CPU each; the
            # other logical CPUs are for Ray Data's read tasks. The dashboard serves the state API that Ray Train's
            # placement-group cleaner polls.
            ensure_ray(num_cpus=max(4, os.cpu_count() or 1), object_store_memory=400 * 1024**2, include_dashboard=True)
            try:
                report = ingest([tmp], cfg.data.root, scales=cfg.model.scales, progress=True)
                log.info("%s", report.summary())
                outcome = run_training(cfg, source=str(config_path))
            finally:
                stop_ray()
    scale = cfg.model.scale
    return QuickstartResult(
        psnr=outcome.metrics.get(f"val_psnr_x{scale}", float("nan")),
        bicubic_psnr=outcome.metrics.get(f"val_bicubic_psnr_x{scale}", float("nan")),
        steps=outcome.steps,
        registered=outcome.registered,
        tracking_uri=tracking.resolve_tracking_uri(cfg.tracking.tracking_uri),
        s3_endpoint=s3.endpoint_url,
    )
