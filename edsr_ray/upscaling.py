"""Upscaling collections of image files: finding inputs, naming outputs, and the per-image read → decode → upscale →
encode → write steps, with bad inputs recorded and skipped instead of stopping the run.

``jobs/upscale.py`` is a thin command over :func:`run_upscale`. The steps are separate functions (:func:`plan_tasks`,
:func:`read_and_decode`, :func:`encode_and_write`, :func:`process_task`) so that a distributed job can run them as
stages of a pipeline and stay on this one code path. Locations go through :mod:`edsr_ray.storage`, so inputs and
outputs may be local folders or ``s3://`` prefixes alike.

Guarantees: an output keeps its input's relative path under the output location; nothing is written outside it (keys
never contain ``..``; local writes are checked against symbolic links); outputs that already exist are skipped, so a
re-run only does what is missing; every write is atomic (temp file + rename, or one S3 PUT), so no partial output is
ever visible.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import torch

from edsr_ray import storage
from edsr_ray.config import InferenceConfig, StorageConfig
from edsr_ray.errors import ConfigError, EdsrRayError, StorageError
from edsr_ray.imaging import (
    FORMAT_EXTENSIONS,
    MAX_PIXELS_DEFAULT,
    DecodedImage,
    decode_image,
    encode_image,
    format_from_name,
)
from edsr_ray.inference import Upscaler, resolve_scale

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
OUTPUT_FORMATS = ("same", "png", "jpeg", "webp")
PROGRESS_EVERY_S = 10.0
# Failures a run records per image instead of stopping: anything the input (or its output location) can cause.
_ITEM_ERRORS = (EdsrRayError, OSError, MemoryError, torch.OutOfMemoryError)


@dataclass(frozen=True)
class OutputOptions:
    """How outputs are written: ``fmt`` "same" keeps each input's format (PNG for other kinds of input)."""

    fmt: str = "same"
    quality: int = 95  # JPEG / WebP
    max_pixels: int = MAX_PIXELS_DEFAULT  # decompression-bomb guard for the inputs

    def __post_init__(self) -> None:
        if self.fmt not in OUTPUT_FORMATS:
            raise ConfigError(f"output format must be one of {list(OUTPUT_FORMATS)}, got {self.fmt!r}")
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"quality must be in 1..100, got {self.quality}")
        if self.max_pixels < 1:
            raise ConfigError(f"max_pixels must be >= 1, got {self.max_pixels}")


@dataclass(frozen=True)
class Task:
    """One image to upscale: where it is, its key relative to the input location, and where its output goes."""

    source: str
    key: str
    dest: str


@dataclass(frozen=True)
class Outcome:
    """What happened to one input. ``status`` is "done", "skipped" (output existed) or "failed" (see ``reason``)."""

    source: str
    dest: str
    status: str
    reason: str = ""
    pixels: int = 0  # input width x height
    seconds: float = 0.0


@dataclass
class Summary:
    """Totals of a run, for the final report and the exit status."""

    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def megapixels(self) -> float:
        return sum(o.pixels for o in self.outcomes if o.status == "done") / 1e6

    def line(self) -> str:
        done = self.count("done")
        rate = done / self.seconds if self.seconds > 0 else 0.0
        return (
            f"upscaled {done} images ({self.megapixels:.2f} input megapixels) in {self.seconds:.1f} s, "
            f"{rate:.2f} img/s; skipped {self.count('skipped')} existing; {len(self.failures)} failed"
        )

    def exit_code(self, allow_failures: int = 0) -> int:
        """0 when at most ``allow_failures`` inputs failed, else 1."""
        return 0 if len(self.failures) <= allow_failures else 1


# --------------------------------------------------------------------------------------------------------------------
# Naming


def output_key(key: str, fmt: str) -> str:
    """The output's relative key: the input's, with the extension of ``fmt`` ("same" keeps it, or makes it .png)."""
    path = PurePosixPath(key)
    if fmt == "same":
        return key if path.suffix.lower() in IMAGE_SUFFIXES else str(path.with_suffix(".png"))
    return str(path.with_suffix(FORMAT_EXTENSIONS[fmt]))


def _real(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def plan_tasks(
    input_uri: str, output_uri: str, fmt: str = "same", cfg: StorageConfig | None = None
) -> tuple[list[Task], list[Outcome]]:
    """Tasks for every image below ``input_uri`` (or for that one file), in sorted order, plus failed outcomes.

    Folders are walked recursively for .png/.jpg/.jpeg/.webp files; a single file is taken whatever its name. Files
    already inside the output location (an output folder inside the input folder) are left out. Two inputs that
    would write the same output (``a.jpg`` and ``a.png`` with ``--format png``) cannot both be written: the second
    is returned as a failed outcome.
    """
    files = storage.list_files(input_uri, cfg)
    single = len(files) == 1 and files[0].rstrip("/") == os.fspath(input_uri).rstrip("/")
    if single:
        keys = [(files[0], PurePosixPath(files[0]).name)]
    else:
        base = os.fspath(input_uri).rstrip("/")
        keys = [(f, f[len(base) + 1 :]) for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
        keys = [(f, k) for f, k in keys if not _inside_output(f, output_uri)]
    tasks, collisions, seen = [], [], {}
    for source, key in keys:
        dest = storage.join(output_uri, output_key(key, fmt))
        if dest in seen:
            collisions.append(Outcome(source, dest, "failed", f"its output {dest} is also the output of {seen[dest]}"))
            continue
        seen[dest] = source
        tasks.append(Task(source, key, dest))
    return tasks, collisions


def _inside_output(source: str, output_uri: str) -> bool:
    if storage.is_s3(source) != storage.is_s3(output_uri):
        return False
    if storage.is_s3(source):
        return source.startswith(output_uri.rstrip("/") + "/")
    return _is_within(_real(source), _real(output_uri))


def check_destination(dest: str, output_uri: str) -> None:
    """Refuse a local destination that a symbolic link would carry outside the output folder."""
    if storage.is_s3(dest):
        return
    if not _is_within(_real(os.path.dirname(dest) or "."), _real(output_uri)):
        raise StorageError(f"refusing to write {dest}: it resolves outside the output folder {output_uri}")


def existing_outputs(output_uri: str, cfg: StorageConfig | None = None) -> set[str]:
    """Every file already under the output location (one listing instead of a check per image)."""
    try:
        return set(storage.list_files(output_uri, cfg))
    except storage.NotFoundError:
        return set()


# --------------------------------------------------------------------------------------------------------------------
# Per-image steps


def read_and_decode(task: Task, options: OutputOptions, cfg: StorageConfig | None = None) -> DecodedImage:
    """The input's pixels (raises ImageError / StorageError naming the input)."""
    return decode_image(storage.read_bytes(task.source, cfg), name=task.source, max_pixels=options.max_pixels)


def encode_and_write(
    task: Task, image: DecodedImage, options: OutputOptions, output_uri: str, cfg: StorageConfig | None = None
) -> int:
    """Encode the upscaled image in the output's format and write it atomically; returns the bytes written."""
    fmt = options.fmt if options.fmt != "same" else format_from_name(task.dest)
    data = encode_image(image, fmt, quality=options.quality)
    check_destination(task.dest, output_uri)
    storage.write_bytes(task.dest, data, cfg)
    return len(data)


def process_task(
    task: Task,
    upscaler: Upscaler,
    scale: int,
    options: OutputOptions,
    output_uri: str,
    cfg: StorageConfig | None = None,
) -> Outcome:
    """Read, decode, upscale, encode and write one image; a failure is returned as an outcome, not raised."""
    start = time.perf_counter()
    try:
        image = read_and_decode(task, options, cfg)
        upscaled = upscaler.upscale_decoded(image, scale)
        encode_and_write(task, upscaled, options, output_uri, cfg)
    except _ITEM_ERRORS as exc:
        reason = str(exc) if isinstance(exc, EdsrRayError) else f"{type(exc).__name__}: {exc}"
        # Image and storage errors already name the input; others get it added.
        logger.warning("failed: %s", reason if task.source in reason else f"{task.source}: {reason}")
        return Outcome(task.source, task.dest, "failed", reason, 0, time.perf_counter() - start)
    seconds = time.perf_counter() - start
    logger.debug("%s -> %s (%dx%d) in %.2f s", task.source, task.dest, image.width, image.height, seconds)
    return Outcome(task.source, task.dest, "done", "", image.width * image.height, seconds)


# --------------------------------------------------------------------------------------------------------------------
# A whole run


def run_upscale(
    model_source: str,
    input_uri: str,
    output_uri: str,
    *,
    scale: int | None = None,
    inference: InferenceConfig | None = None,
    options: OutputOptions | None = None,
    device: str | None = None,
    cfg: StorageConfig | None = None,
) -> Summary:
    """Upscale every image below ``input_uri`` into ``output_uri`` with the model at ``model_source``.

    Errors that make the whole run impossible (model missing or not EDSR/MDSR, scale not served by the model,
    input location missing) are raised before any image is touched; per-image problems end up in the summary.
    """
    from edsr_ray.models import load_model

    inference = inference or InferenceConfig()
    options = options or OutputOptions(max_pixels=inference.max_pixels)
    if not storage.is_s3(output_uri) and os.path.exists(output_uri) and not os.path.isdir(output_uri):
        raise StorageError(f"--output {output_uri} is a file; expected a folder (created when missing)")
    model = load_model(model_source, storage=cfg)
    scale = resolve_scale(model, scale)
    upscaler = Upscaler.from_config(model, inference, device=device)
    tasks, collisions = plan_tasks(input_uri, output_uri, options.fmt, cfg)
    if not tasks and not collisions:
        logger.warning("no images (%s) found in %s", ", ".join(IMAGE_SUFFIXES), input_uri)
    existing = existing_outputs(output_uri, cfg)
    logger.info("%d images to consider with %r at x%d", len(tasks), upscaler, scale)

    summary = Summary(outcomes=list(collisions))
    for outcome in collisions:
        logger.warning("failed: %s: %s", outcome.source, outcome.reason)
    start = last_report = time.perf_counter()
    for i, task in enumerate(tasks, start=1):
        if task.dest in existing:
            summary.outcomes.append(Outcome(task.source, task.dest, "skipped"))
        else:
            summary.outcomes.append(process_task(task, upscaler, scale, options, output_uri, cfg))
        now = time.perf_counter()
        if now - last_report >= PROGRESS_EVERY_S:
            last_report = now
            logger.info("%d/%d images, %.2f img/s", i, len(tasks), summary.count("done") / (now - start))
    summary.seconds = time.perf_counter() - start
    return summary
