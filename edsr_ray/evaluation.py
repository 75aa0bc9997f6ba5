"""Benchmark evaluation: the paper's PSNR/SSIM tables for any models on any HR/LR sets, distributed with Ray Data.

``jobs/evaluate.py`` is a thin command over :func:`evaluate`. The pieces, in the order a run uses them:

* **Sets.** :func:`discover_sets` finds the evaluation sets at a location (``s3://`` prefix or local folder): an
  ingested root with ``manifest.parquet``; the same layout without a manifest (``benchmark/Set5/HR`` +
  ``LR_bicubic/X2``, ``DIV2K_valid_HR`` + ``DIV2K_valid_LR_bicubic/X2``, or a single set folder holding ``HR/``);
  or any folder of HR images, whose LR inputs are made on the fly with the MATLAB-compatible :func:`imresize` after
  cropping the HR image to a multiple of the scale. DIV2K sets use the ``div2k`` protocol (RGB, border scale + 6), all
  others the ``benchmark`` protocol (Y, border scale), as in the paper.
* **Models.** :class:`ModelSpec`: ``[LABEL=]SOURCE`` where SOURCE is anything :func:`~edsr_ray.weights.load_model`
  reads, or ``bicubic`` (the baseline row: ``imresize(lr, scale)``). An MDSR model is evaluated at every requested
  scale it has; an EDSR model only at its own (its other cells read ``n/a``). Single-scale models given one label
  share a column, each filling its scale (``EDSR=edsr_x2.pt EDSR=edsr_x3.pt EDSR=edsr_x4.pt`` is the paper's "EDSR").
* **Preflight.** Everything checkable without computing is checked before any image is upscaled: models load, sets
  exist, every LR partner exists (and, with a manifest, has size HR / scale). Problems raise :class:`EvaluationError`
  naming every bad item.
* **Per-image work.** :class:`ImageEvaluator` (read, decode, size check, upscale through the shared
  :class:`~edsr_ray.inference.Upscaler`, quantised PSNR/SSIM from :mod:`edsr_ray.metrics`, optional SR image) is the
  one code path: Ray Data runs it in an actor pool (one GPU per actor when the cluster has GPUs), and
  ``use_ray=False`` calls it in-process for tiny runs. A problem found only while evaluating (a size mismatch without
  a manifest, an undecodable file) fails that image alone: it is listed with its reason, left out of the means, the
  table cell is marked, and :attr:`EvaluationReport.exit_code` is 1.
* **Outputs** under the output location only: ``results.md`` (the table), ``results.csv`` (one row per model, set,
  scale and image), ``results.json`` (options, models, summary, images, failures), ``failures.csv`` when any image
  failed, optional SR images under ``images/`` and worst/best picture grids ``grid_<model>.png``; all of it logged to
  MLflow when a tracking URI is given or ``MLFLOW_TRACKING_URI`` is set.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import re
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from edsr_ray import storage
from edsr_ray.config import PRECISIONS, SCALES, from_dict, to_dict
from edsr_ray.errors import ConfigError, EdsrRayError, StorageError
from edsr_ray.imaging import IMAGE_SUFFIXES, decode_image, encode_image, imresize
from edsr_ray.infra.ray import ensure_ray
from edsr_ray.manifest import MANIFEST_NAME, read_manifest
from edsr_ray.metrics import PROTOCOLS, psnr, ssim
from edsr_ray.storage import StorageConfig

logger = logging.getLogger(__name__)

BICUBIC = "bicubic"
ENSEMBLE_MODES = ("off", "both", "only")
# Row order of the paper's Table 3; other sets follow in the order they were found.
PAPER_SET_ORDER = ("Set5", "Set14", "B100", "Urban100", "DIV2K_valid")
PROTOCOL_NOTE = (
    "PSNR (dB) / SSIM of 8-bit outputs. Benchmark sets: Y channel, `scale` border pixels ignored; DIV2K: RGB PSNR, "
    "`scale + 6` border pixels ignored (SSIM on Y)."
)
# Side (HR pixels) of the centre crops shown in the worst/best picture grids.
GRID_CROP = 120
# Set and image names listed in one error message before "... and N more".
_LIST_LIMIT = 12
# Errors an input image can cause while it is evaluated: recorded as that image's failure, the run goes on.
_ITEM_ERRORS = (EdsrRayError, OSError, ValueError)

_BENCH_HR = re.compile(r"^(?:(?P<prefix>.+)/)?HR/(?P<file>[^/]+)$")
_BENCH_LR = re.compile(r"^(?:(?P<prefix>.+)/)?LR_bicubic/X(?P<scale>\d)/(?P<file>[^/]+)$")
_DIV2K_HR = re.compile(r"^(?:(?P<prefix>.+)/)?DIV2K_(?P<split>[A-Za-z0-9]+)_HR/(?P<file>[^/]+)$")
_DIV2K_LR = re.compile(r"^(?:(?P<prefix>.+)/)?DIV2K_(?P<split>[A-Za-z0-9]+)_LR_bicubic/X(?P<scale>\d)/(?P<file>[^/]+)$")


class EvaluationError(EdsrRayError):
    """The evaluation cannot start: an unknown set, a missing LR partner, a size mismatch, a bad model or option."""


# --------------------------------------------------------------------------------------------------------------------
# Evaluation sets


@dataclass(frozen=True)
class EvalImage:
    """One HR image and where its LR partner for each scale is (an empty ``lr_uris`` means LR is generated).

    ``hr_size`` and ``lr_sizes`` are (width, height) when a manifest recorded them, so mismatches surface before any
    image is read.
    """

    id: str
    hr_uri: str
    lr_uris: Mapping[int, str] = field(default_factory=dict)
    hr_size: tuple[int, int] | None = None
    lr_sizes: Mapping[int, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalSet:
    """A named evaluation set and its images, sorted by id.

    ``kind`` says where the pairs come from: ``manifest`` (an ingested root), ``layout`` (the official folder layout,
    LR partners found by name) or ``generated`` (HR images only; LR inputs are made with imresize).
    """

    name: str
    location: str
    protocol: str
    images: tuple[EvalImage, ...]
    kind: str = "layout"
    dataset: str = ""  # the dataset name (matches --sets too), e.g. "DIV2K" for "DIV2K_valid"
    split: str = ""

    @property
    def generated(self) -> bool:
        return self.kind == "generated"


def protocol_for(set_name: str) -> str:
    """The paper's protocol for a set: ``div2k`` for DIV2K sets, ``benchmark`` for every other."""
    return "div2k" if set_name.upper().startswith("DIV2K") else "benchmark"


def _display_name(location: str) -> str:
    name = location.rstrip("/").rsplit("/", 1)[-1]
    if storage.is_s3(location) and "/" not in location[len("s3://") :].rstrip("/"):
        name = location[len("s3://") :].rstrip("/")  # a bare bucket
    return name or "images"


def _lr_scale_of(stem: str, scale: int) -> str | None:
    """``babyx2`` → ``baby`` for scale 2 (official LR naming), else None."""
    suffix = f"x{scale}"
    return stem[: -len(suffix)] if stem.lower().endswith(suffix) and len(stem) > len(suffix) else None


def discover_sets(location: str, cfg: StorageConfig | None = None, *, exclude: str | None = None) -> list[EvalSet]:
    """The evaluation sets at ``location`` (see the module docstring for the layouts understood).

    Files below ``exclude`` (an output location inside the dataset folder) are ignored, so a second run never takes
    the first run's SR images for HR images. Raises :class:`EvaluationError` when the location holds no images, and
    StorageError when it cannot be listed.
    """
    files = storage.list_files(location, cfg)
    if exclude:
        skip = _absolute(exclude).rstrip("/") + "/"
        files = [f for f in files if not _absolute(f).startswith(skip)]
    base = location.rstrip("/")
    rel = [f[len(base) + 1 :] for f in files if f.startswith(base + "/")]
    if MANIFEST_NAME in rel:
        return _sets_from_manifest(location, cfg)
    images = [r for r in rel if r.lower().endswith(IMAGE_SUFFIXES)]
    if not images:
        raise EvaluationError(
            f"{location}: no images ({', '.join(IMAGE_SUFFIXES)}) and no {MANIFEST_NAME} found; expected an ingested "
            "dataset root, a set folder with HR/ and LR_bicubic/X<scale>/, or a folder of HR images"
        )
    sets = _sets_from_layout(location, images)
    if sets:
        return sets
    # Any other folder: every image below it is an HR image; LR inputs are generated.
    entries = tuple(EvalImage(_strip_suffix(r), storage.join(location, r)) for r in sorted(images))
    name = _display_name(location)
    return [EvalSet(name, location, protocol_for(name), entries, kind="generated", dataset=name)]


def _absolute(uri: str) -> str:
    return uri if storage.is_s3(uri) else os.path.realpath(storage.local_path(uri))


def _strip_suffix(rel: str) -> str:
    path = PurePosixPath(rel)
    return str(path.with_suffix(""))


def _sets_from_layout(location: str, images: Sequence[str]) -> list[EvalSet]:
    """Sets in the official folder layouts (benchmark ``HR``/``LR_bicubic`` and DIV2K ``*_HR``/``*_LR_bicubic``)."""
    # (kind, set prefix) -> {stem: HR rel path} and -> {stem: {scale: LR rel path}}
    hr: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    lr: dict[tuple[str, str], dict[str, dict[int, str]]] = defaultdict(lambda: defaultdict(dict))
    for r in images:
        if m := _DIV2K_LR.match(r) or _BENCH_LR.match(r):
            kind = "div2k" if "split" in m.groupdict() else "bench"
            group = (kind, f"{m['prefix'] or ''}|{m['split']}" if kind == "div2k" else m["prefix"] or "")
            scale = int(m["scale"])
            stem = _lr_scale_of(PurePosixPath(m["file"]).stem, scale)
            if stem is not None:
                lr[group][stem][scale] = r
        elif m := _DIV2K_HR.match(r):
            hr[("div2k", f"{m['prefix'] or ''}|{m['split']}")][PurePosixPath(m["file"]).stem] = r
        elif m := _BENCH_HR.match(r):
            hr[("bench", m["prefix"] or "")][PurePosixPath(m["file"]).stem] = r
    sets = []
    for (kind, prefix), stems in hr.items():
        partners = lr.get((kind, prefix), {})
        entries = tuple(
            EvalImage(
                stem,
                storage.join(location, path),
                {s: storage.join(location, p) for s, p in partners.get(stem, {}).items()},
            )
            for stem, path in sorted(stems.items())
        )
        if kind == "div2k":
            folder, split = prefix.split("|")
            name, dataset = f"DIV2K_{split}", "DIV2K"
        else:
            folder, split = prefix, ""
            name = dataset = folder.rsplit("/", 1)[-1] if folder else _display_name(location)
        set_location = storage.join(location, folder) if folder else location
        sets.append(EvalSet(name, set_location, protocol_for(name), entries, dataset=dataset, split=split))
    return sets


def _sets_from_manifest(location: str, cfg: StorageConfig | None) -> list[EvalSet]:
    """Sets from an ingested root's ``manifest.parquet``: one per (dataset, split), keys relative to the root."""
    import pandas as pd

    manifest = read_manifest(location, cfg)
    rows = [{k: (None if v is pd.NA else v) for k, v in r.items()} for r in manifest.astype(object).to_dict("records")]
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(str(row["dataset"]), str(row.get("split") or ""))].append(row)
    splits_per_dataset = defaultdict(set)
    for dataset, split in groups:
        splits_per_dataset[dataset].add(split)
    sets = []
    for (dataset, split), members in groups.items():
        # DIV2K is always named with its split (DIV2K_valid); other sets only when they come in several splits.
        several = len(splits_per_dataset[dataset]) > 1 or dataset.upper() == "DIV2K"
        name = f"{dataset}_{split}" if split and several else dataset
        members.sort(key=lambda r: str(r["id"]))  # the order of the folder layouts (and of the official code)
        entries = tuple(_manifest_image(location, row) for row in members)
        sets.append(EvalSet(name, location, protocol_for(name), entries, "manifest", dataset, split))
    return sets


def _manifest_image(location: str, row: Mapping[str, Any]) -> EvalImage:
    lr_uris, lr_sizes = {}, {}
    for s in SCALES:
        key = row.get(f"lr_x{s}_key")
        if key:
            lr_uris[s] = storage.join(location, key)
            w, h = row.get(f"lr_x{s}_width"), row.get(f"lr_x{s}_height")
            if w is not None and h is not None:
                lr_sizes[s] = (int(w), int(h))
    w, h = row.get("hr_width"), row.get("hr_height")
    hr_size = (int(w), int(h)) if w is not None and h is not None else None
    return EvalImage(str(row["id"]), storage.join(location, row["hr_key"]), lr_uris, hr_size, lr_sizes)


def select_sets(
    locations: Sequence[str],
    names: Sequence[str] = (),
    cfg: StorageConfig | None = None,
    *,
    limit: int | None = None,
    exclude: str | None = None,
) -> list[EvalSet]:
    """The sets to evaluate: every set found at ``locations`` (training splits left out), or the ones ``names`` asks
    for, matched case-insensitively by set name (``DIV2K_valid``) or by dataset name when that is unambiguous
    (``DIV2K``). ``limit`` keeps the first images of each set. Unknown or ambiguous names raise EvaluationError."""
    found: list[EvalSet] = []
    seen: dict[str, str] = {}
    for loc in locations:
        for s in discover_sets(loc, cfg, exclude=exclude):
            if s.name.lower() in seen:
                raise EvaluationError(
                    f"set {s.name!r} is found both in {seen[s.name.lower()]} and in {s.location}; evaluate them in "
                    "separate runs"
                )
            seen[s.name.lower()] = s.location
            found.append(s)
    if names:
        chosen = []
        for name in names:
            match = [s for s in found if s.name.lower() == name.lower()]
            if not match:
                by_dataset = [s for s in found if s.dataset.lower() == name.lower() and s.split != "train"]
                if len(by_dataset) > 1:
                    raise EvaluationError(
                        f"set {name!r} is ambiguous: choose one of {', '.join(s.name for s in by_dataset)}"
                    )
                match = by_dataset
            if not match:
                available = ", ".join(s.name for s in found) or "none"
                raise EvaluationError(f"unknown set {name!r} in {', '.join(locations)}; available: {available}")
            if match[0] not in chosen:
                chosen.append(match[0])
    else:
        chosen = [s for s in found if s.split != "train"] or found
    if limit is not None:
        chosen = [dataclasses.replace(s, images=s.images[:limit]) for s in chosen]
    empty = [s.name for s in chosen if not s.images]
    if empty:
        raise EvaluationError(f"set(s) {', '.join(empty)} hold no images")
    return chosen


def table_order(names: Sequence[str]) -> list[str]:
    """Set names in the paper's row order (Set5, Set14, B100, Urban100, DIV2K_valid), then the others as given."""
    rank = {n: i for i, n in enumerate(PAPER_SET_ORDER)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), names.index(n)))


# --------------------------------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate: its column label and source (a weights location or ``bicubic``)."""

    label: str
    source: str

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``SOURCE`` or ``LABEL=SOURCE``; the default label is the file stem (``edsr_x2``), ``name/version`` for
        ``models:/name/version``, or ``bicubic``."""
        text = text.strip()
        if not text:
            raise EvaluationError("--model needs a source: a weights file or URI, models:/name/version, or bicubic")
        head, sep, tail = text.partition("=")
        if sep and head and not any(c in head for c in "/:\\") and tail:
            return cls(head, tail)
        return cls(default_label(text), text)

    @property
    def is_bicubic(self) -> bool:
        return self.source.lower() == BICUBIC


def default_label(source: str) -> str:
    if source.lower() == BICUBIC:
        return BICUBIC
    for prefix in ("models:/", "runs:/"):
        if source.startswith(prefix):
            return source[len(prefix) :].strip("/")
    stem = PurePosixPath(source.rstrip("/").replace("\\", "/")).name
    return re.sub(r"\.(pt|pth)$", "", stem) or source


def safe_name(text: str) -> str:
    """``text`` reduced to a file-name-safe form (letters, digits, ``.-_``; ``+`` becomes ``_plus``)."""
    text = text.replace("+", "_plus")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "item"


@dataclass(frozen=True)
class Variant:
    """One column of the table: a model, with or without ×8 self-ensemble (label ``NAME+``)."""

    label: str
    model: str  # the ModelSpec label
    self_ensemble: bool


@dataclass
class _ResolvedModel:
    spec: ModelSpec
    scales: tuple[int, ...]
    variants: list[Variant]
    checkpoint: dict[str, Any] | None  # None for bicubic


# --------------------------------------------------------------------------------------------------------------------
# Options and results


@dataclass(frozen=True)
class EvaluationOptions:
    """What to evaluate, how and where the results go (the command's arguments, validated).

    ``scales`` empty: every scale the models have (2, 3, 4 for bicubic alone). ``self_ensemble``: ``off``, ``both``
    (plain and ``+`` columns) or ``only`` (just ``+``). ``protocol``: ``auto`` (by set) or one for all sets.
    ``precision`` defaults to fp32 so numbers are comparable with the paper. ``grid``: worst and best images per
    model in a picture grid (0: none). ``workers``: actors (default: one per GPU, or one per CPU). ``use_ray=False``
    evaluates in this process.
    """

    models: tuple[str, ...]
    datasets: tuple[str, ...]
    output: str
    sets: tuple[str, ...] = ()
    scales: tuple[int, ...] = ()
    self_ensemble: str = "off"
    protocol: str = "auto"
    tile: int | None = None
    precision: str = "fp32"
    limit: int | None = None
    save_images: bool = False
    grid: int = 0
    tracking_uri: str | None = None
    experiment: str = "edsr-ray-eval"
    workers: int | None = None
    use_ray: bool = True
    storage: StorageConfig | None = None

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(bool(self.models), "give at least one --model (a weights file or URI, models:/..., or bicubic)")
        need(bool(self.datasets), "give at least one --dataset (an ingested root, a set folder or an image folder)")
        need(bool(self.output), "give an --output location (a folder or s3:// prefix)")
        for s in self.scales:
            need(s in SCALES, f"scale {s} is not supported; choose from {list(SCALES)}")
        need(self.self_ensemble in ENSEMBLE_MODES, f"self_ensemble must be one of {list(ENSEMBLE_MODES)}")
        need(self.protocol in ("auto", *PROTOCOLS), f"protocol must be auto or one of {list(PROTOCOLS)}")
        need(self.tile is None or self.tile >= 8, f"tile must be >= 8, got {self.tile}")
        need(self.precision in PRECISIONS, f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        need(self.limit is None or self.limit >= 1, f"limit must be >= 1, got {self.limit}")
        need(self.grid >= 0, f"grid must be >= 0, got {self.grid}")
        need(self.workers is None or self.workers >= 1, f"workers must be >= 1, got {self.workers}")
        # Locations in a scheme nothing here reads (gs://, S3://, gs:bucket) fail now, before anything is created.
        for dataset in self.datasets:
            storage.location_kind(dataset, storage.DATA_LOCATIONS, what="--dataset")
        storage.location_kind(self.output, storage.DATA_LOCATIONS, what="--output")
        for model in self.models:
            spec = ModelSpec.parse(model)
            if not spec.is_bicubic:
                storage.location_kind(spec.source, storage.MODEL_LOCATIONS, what="--model")


@dataclass(frozen=True)
class ImageResult:
    """One model variant on one image at one scale; ``status`` is ``ok`` or ``failed`` (see ``error``)."""

    model: str
    set: str
    scale: int
    image: str
    psnr: float = math.nan
    ssim: float = math.nan
    seconds: float = math.nan
    status: str = "ok"
    error: str = ""
    sr_uri: str = ""
    picture: bytes = b""  # JPEG strip bicubic | model | HR for the picture grid (only with options.grid)

    def record(self) -> dict[str, Any]:
        """The CSV/JSON fields."""
        return {
            "model": self.model,
            "set": self.set,
            "scale": self.scale,
            "image": self.image,
            "psnr": _finite_or_none(self.psnr),
            "ssim": _finite_or_none(self.ssim),
            "seconds": _finite_or_none(self.seconds),
            **({"sr_image": self.sr_uri} if self.sr_uri else {}),
        }


@dataclass(frozen=True)
class SummaryRow:
    """Mean PSNR/SSIM of one model variant on one set at one scale (over the images that did not fail)."""

    model: str
    set: str
    scale: int
    protocol: str
    images: int
    failed: int
    psnr: float
    ssim: float
    seconds: float


@dataclass
class EvaluationReport:
    """Everything a run produced: per-image results, failures, the summary, the table and the files written."""

    results: list[ImageResult]
    failures: list[ImageResult]
    summary: list[SummaryRow]
    table: str
    variants: list[str]
    files: dict[str, str] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        """0 when every image was evaluated, 1 when some failed (they are listed in ``failures``)."""
        return 1 if self.failures else 0


def _finite_or_none(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


# --------------------------------------------------------------------------------------------------------------------
# The per-image work (one code path for the Ray actors and the in-process run)


def _output_join(output: str, *parts: str) -> str:
    """``output/parts...``; refuses anything that would land outside ``output`` (``..``, a symbolic link out)."""
    uri = storage.join(output, *parts)
    if not storage.is_s3(uri):
        root = os.path.realpath(storage.local_path(output))
        parent = os.path.realpath(os.path.dirname(storage.local_path(uri)))
        if parent != root and not parent.startswith(root.rstrip(os.sep) + os.sep):
            raise StorageError(f"refusing to write {uri}: it resolves outside the output folder {output}")
    return uri


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
            sr_uri = _output_join(
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


# --------------------------------------------------------------------------------------------------------------------
# Planning and preflight


def resolve_models(specs: Sequence[ModelSpec], ensemble: str, cfg: StorageConfig | None) -> list[_ResolvedModel]:
    """Load every model once (a bad file fails here, by name) and decide its table columns."""
    from edsr_ray.weights import load_model, model_checkpoint

    out: list[_ResolvedModel] = []
    for spec in specs:
        if spec.is_bicubic and any(m.spec.label == spec.label for m in out):
            raise EvaluationError(f"two --model entries are both labelled {spec.label!r}; name them with LABEL=SOURCE")
        if spec.is_bicubic:
            out.append(_ResolvedModel(spec, tuple(SCALES), [Variant(spec.label, spec.label, False)], None))
            continue
        model = load_model(spec.source, storage=cfg)
        variants = []
        if ensemble in ("off", "both"):
            variants.append(Variant(spec.label, spec.label, False))
        if ensemble in ("both", "only"):
            variants.append(Variant(f"{spec.label}+", spec.label, True))
        for other in out:
            # One label may gather single-scale models into one column (EDSR x2, x3, x4 as the paper's "EDSR").
            if other.spec.label == spec.label and (other.checkpoint is None or set(other.scales) & set(model.scales)):
                raise EvaluationError(
                    f"--model {spec.label}={spec.source} and {other.spec.label}={other.spec.source} share a label and "
                    f"a scale ({sorted(set(other.scales) & set(model.scales)) or 'bicubic'}); one column takes each "
                    "scale from one model: give them different labels"
                )
        out.append(_ResolvedModel(spec, tuple(model.scales), variants, model_checkpoint(model)))
    _check_columns(out)
    return out


def _check_columns(models: Sequence[_ResolvedModel]) -> None:
    """Every table column holds one model family, and no two columns share a file/metric name."""
    owners: dict[str, str] = {}  # column label -> the --model label it comes from
    names: dict[str, str] = {}  # safe_name(column) -> column label
    for m in models:
        for v in m.variants:
            owner = owners.setdefault(v.label, v.model)
            if owner != v.model:
                raise EvaluationError(
                    f"the column {v.label!r} would hold both --model {owner} and the self-ensemble of --model "
                    f"{v.model}: rename one of them (labels ending in '+' are taken by self-ensembles)"
                )
            other = names.setdefault(safe_name(v.label), v.label)
            if other != v.label:
                raise EvaluationError(
                    f"the columns {other!r} and {v.label!r} would share the file and metric name "
                    f"{safe_name(v.label)!r}: rename one of them"
                )


def plan_items(
    sets: Sequence[EvalSet], scales: Sequence[int], protocol: str = "auto"
) -> tuple[list[dict[str, Any]], list[str]]:
    """Work items (set, image, scale, protocol, HR and LR URIs) plus the problems found without reading an image:
    missing LR partners and, where a manifest recorded sizes, LR sizes other than HR / scale."""
    items, problems = [], []
    for s in sets:
        for scale in scales:
            missing = []
            for img in s.images:
                lr_uri = "" if s.generated else img.lr_uris.get(scale)
                if lr_uri is None:
                    missing.append(img.id)
                    continue
                if lr_uri and img.hr_size is not None and scale in img.lr_sizes:
                    (hw, hh), (lw, lh) = img.hr_size, img.lr_sizes[scale]
                    if (lw, lh) != (hw // scale, hh // scale):
                        problems.append(
                            f"{s.name}/{img.id} x{scale}: size mismatch: LR {lr_uri} is {lw}x{lh} but HR "
                            f"{img.hr_uri} is {hw}x{hh}; x{scale} needs {hw // scale}x{hh // scale}"
                        )
                        continue
                items.append(
                    {
                        "set": s.name,
                        "image": img.id,
                        "scale": int(scale),
                        "protocol": s.protocol if protocol == "auto" else protocol,
                        "hr_uri": img.hr_uri,
                        "lr_uri": lr_uri,
                    }
                )
            if missing and len(missing) == len(s.images) and len(missing) > 1:
                problems.append(f"{s.name} x{scale}: no LR images at all (is X{scale} ingested for {s.location}?)")
            else:
                problems.extend(
                    f"{s.name}/{i} x{scale}: missing LR partner of {_hr_uri(s, i)} ({_missing_hint(s, i, scale)})"
                    for i in missing
                )
    return items, problems


def _hr_uri(s: EvalSet, image_id: str) -> str:
    return next(img.hr_uri for img in s.images if img.id == image_id)


def _missing_hint(s: EvalSet, image_id: str, scale: int) -> str:
    """Where the missing LR image was looked for."""
    if s.kind == "manifest":
        return f"the manifest has no lr_x{scale}_key for it; ingest X{scale} for this set"
    hr = _hr_uri(s, image_id)
    stem = PurePosixPath(hr).stem
    if "_HR/" in hr:  # DIV2K layout
        return f"expected {hr.rsplit('/', 1)[0][: -len('_HR')]}_LR_bicubic/X{scale}/{stem}x{scale}.png"
    folder = hr.rsplit("/HR/", 1)[0]
    return f"expected {folder}/LR_bicubic/X{scale}/{stem}x{scale}.png"


def _listing(problems: Sequence[str]) -> str:
    shown = list(problems[:_LIST_LIMIT])
    more = len(problems) - len(shown)
    return "; ".join(shown) + (f"; ... and {more} more" if more else "")


def _check_output(output: str) -> None:
    if not storage.is_s3(output):
        path = storage.local_path(output)
        if os.path.exists(path) and not os.path.isdir(path):
            raise EvaluationError(f"--output {output} is a file; expected a folder (created when missing)")


# --------------------------------------------------------------------------------------------------------------------
# Running: Ray Data actor pool, or in-process


def _run_items(
    items: list[dict[str, Any]], models: Sequence[_ResolvedModel], options: EvaluationOptions
) -> list[ImageResult]:
    """Evaluate the work items with an actor pool (Ray Data), or in this process when ``use_ray`` is off."""
    kwargs = {
        "tile": options.tile,
        "precision": options.precision,
        "storage_config": to_dict(options.storage) if options.storage is not None else None,
        "output": options.output,
        "save_images": options.save_images,
        "pictures": options.grid > 0,
    }

    def spec(m: _ResolvedModel, checkpoint: Any) -> dict[str, Any]:
        return {"checkpoint": checkpoint, "scales": list(m.scales), "variants": [asdict(v) for v in m.variants]}

    if not options.use_ray:
        evaluator = ImageEvaluator([spec(m, m.checkpoint) for m in models], **kwargs)
        return [r for item in items for r in evaluator.evaluate(item)]

    import ray

    # Weights go to the object store once; every actor reads them from there (not from the model's original source,
    # which workers may not reach, e.g. an MLflow server only the driver can see).
    specs = [spec(m, None if m.checkpoint is None else ray.put(m.checkpoint)) for m in models]
    resources = ray.cluster_resources()
    if any(m.checkpoint is not None for m in models) and resources.get("GPU", 0) >= 1:
        slots, per_actor = int(resources["GPU"]), {"num_gpus": 1}
    else:
        slots, per_actor = max(1, int(resources.get("CPU", 1))), {"num_cpus": 1}
    actors = max(1, min(options.workers or slots, len(items)))
    logger.info("evaluating %d work items on up to %d actor(s) with %s", len(items), actors, per_actor)
    # One block per item, so the pool spreads single images over its actors instead of handing one actor a block.
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        ImageEvaluator,
        fn_constructor_args=(specs,),
        fn_constructor_kwargs=kwargs,
        batch_size=1,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        **per_actor,
    )
    return [_result_from_row(r) for r in ds.take_all()]


def _result_from_row(row: Mapping[str, Any]) -> ImageResult:
    def num(x: Any) -> float:
        return math.nan if x is None else float(x)

    return ImageResult(
        model=str(row["model"]),
        set=str(row["set"]),
        scale=int(row["scale"]),
        image=str(row["image"]),
        psnr=num(row["psnr"]),
        ssim=num(row["ssim"]),
        seconds=num(row["seconds"]),
        status=str(row["status"]),
        error=str(row["error"] or ""),
        sr_uri=str(row["sr_uri"] or ""),
        picture=bytes(row["picture"] or b""),
    )


# --------------------------------------------------------------------------------------------------------------------
# Summary, table, files


def summarize(results: Iterable[ImageResult], protocols: Mapping[str, str]) -> list[SummaryRow]:
    """Means per (variant, set, scale) over the images evaluated, with counts of images and failures."""
    groups: dict[tuple[str, str, int], list[ImageResult]] = defaultdict(list)
    for r in results:
        groups[(r.model, r.set, r.scale)].append(r)

    def mean(values: list[float]) -> float:
        # The official code averages per-image PSNR (not the PSNR of the pooled MSE); so does the paper's table.
        return float(np.mean(values)) if values else math.nan

    rows = []
    for (model, set_name, scale), members in groups.items():
        ok = [r for r in members if r.status == "ok"]
        rows.append(
            SummaryRow(
                model=model,
                set=set_name,
                scale=scale,
                protocol=protocols.get(set_name, protocol_for(set_name)),
                images=len(ok),
                failed=len(members) - len(ok),
                psnr=mean([r.psnr for r in ok]),
                ssim=mean([r.ssim for r in ok]),
                seconds=mean([r.seconds for r in ok]),
            )
        )
    return rows


def format_cell(row: SummaryRow | None) -> str:
    """``38.11/.9601`` as in the paper; ``n/a`` when the model lacks the scale; ``*`` when some images failed."""
    if row is None:
        return "n/a"
    if row.images == 0:
        return "failed"
    ssim_text = f"{row.ssim:.4f}".replace("0.", ".", 1) if math.isfinite(row.ssim) else "nan"
    return f"{row.psnr:.2f}/{ssim_text}" + ("*" if row.failed else "")


def markdown_table(
    summary: Sequence[SummaryRow], variants: Sequence[str], sets: Sequence[str], scales: Sequence[int]
) -> str:
    """The paper's layout: one row per set and scale, one column per model variant, cells PSNR/SSIM."""
    by_key = {(r.model, r.set, r.scale): r for r in summary}
    lines = [
        "| Dataset | Scale | " + " | ".join(variants) + " |",
        "|---|---|" + "---|" * len(variants),
    ]
    for set_name in sets:
        for scale in scales:
            cells = [format_cell(by_key.get((v, set_name, scale))) for v in variants]
            lines.append(f"| {set_name} | ×{scale} | " + " | ".join(cells) + " |")
    notes = [PROTOCOL_NOTE]
    failed = [r for r in summary if r.failed]
    if failed:
        notes.append(
            "\\* some images failed and are left out of the mean: "
            + "; ".join(f"{r.model} {r.set} ×{r.scale}: {r.failed} of {r.failed + r.images}" for r in failed)
            + " (see failures.csv)."
        )
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n"


def _csv(records: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for rec in records:
        writer.writerow({k: ("" if rec.get(k) is None else rec.get(k)) for k in columns})
    return buf.getvalue().encode()


def write_outputs(report: EvaluationReport, options: EvaluationOptions, models: Sequence[_ResolvedModel]) -> None:
    """``results.md``, ``results.csv``, ``results.json`` (+ ``failures.csv``) under the output location."""
    cfg = options.storage
    ok_records = [r.record() for r in report.results]
    failure_records = [{**r.record(), "error": r.error} for r in report.failures]
    document = {
        "protocol": PROTOCOL_NOTE,
        "options": _public_options(options),
        "models": [
            {
                "label": m.spec.label,
                "source": m.spec.source,
                "scales": list(m.scales),
                "columns": [v.label for v in m.variants],
            }
            for m in models
        ],
        "summary": [{k: _json_value(v) for k, v in asdict(r).items()} for r in report.summary],
        "images": ok_records,
        "failures": failure_records,
    }
    files = {
        "results.md": report.table.encode(),
        "results.csv": _csv(ok_records, ["model", "set", "scale", "image", "psnr", "ssim", "seconds"]),
        "results.json": json.dumps(document, indent=2).encode(),
    }
    if report.failures:
        files["failures.csv"] = _csv(failure_records, ["model", "set", "scale", "image", "error"])
    for name, data in files.items():
        uri = _output_join(options.output, name)
        storage.write_bytes(uri, data, cfg)
        report.files[name] = uri


def _public_options(options: EvaluationOptions) -> dict[str, Any]:
    # Endpoints and tracking URIs stay out of result files and run params (they may name internal hosts).
    return {k: v for k, v in to_dict(options).items() if k not in ("storage", "tracking_uri")}


def _json_value(v: Any) -> Any:
    return _finite_or_none(v) if isinstance(v, float) else v


def picture_grid(
    results: Sequence[ImageResult], k: int, baseline: Mapping[tuple[str, int, str], float]
) -> bytes | None:
    """PNG of the ``k`` worst and ``k`` best images of one variant (bicubic | model | HR centre crops, captioned).

    Images are ranked by PSNR gain over bicubic when the bicubic baseline was evaluated too, else by PSNR.
    """
    from PIL import Image, ImageDraw

    ranked = [r for r in results if r.status == "ok" and r.picture]
    if not ranked:
        return None

    def gain(r: ImageResult) -> float:
        base = baseline.get((r.set, r.scale, r.image))
        return r.psnr - base if base is not None else r.psnr

    ranked.sort(key=gain)
    chosen = [("worst", r) for r in ranked[:k]] + [("best", r) for r in ranked[max(k, len(ranked) - k) :][::-1]]
    strips, caption_h = [], 16
    for tag, r in chosen:
        strip = Image.open(io.BytesIO(r.picture)).convert("RGB")
        canvas = Image.new("RGB", (strip.width, strip.height + caption_h), "white")
        canvas.paste(strip, (0, caption_h))
        base = baseline.get((r.set, r.scale, r.image))
        extra = f" ({r.psnr - base:+.2f} vs bicubic)" if base is not None else ""
        ImageDraw.Draw(canvas).text((2, 2), f"{tag}: {r.set} {r.image} x{r.scale} {r.psnr:.2f} dB{extra}", fill="black")
        strips.append(canvas)
    width = max(s.width for s in strips)
    grid = Image.new("RGB", (width, sum(s.height + 4 for s in strips)), "white")
    y = 0
    for s in strips:
        grid.paste(s, (0, y))
        y += s.height + 4
    return encode_image(np.asarray(grid), "png")


def log_to_mlflow(report: EvaluationReport, options: EvaluationOptions, uri: str, grids: Mapping[str, bytes]) -> str:
    """One MLflow run: options as params, PSNR/SSIM per set, scale and variant as metrics, the outputs as artifacts."""
    from edsr_ray import tracking

    mlflow = tracking.mlflow_module()
    exp_id = tracking.ensure_experiment(options.experiment, uri)
    run = mlflow.MlflowClient(tracking_uri=uri).create_run(
        exp_id, run_name="evaluate", tags={"edsr_ray.job": "evaluate"}
    )
    run_logger = tracking.RunLogger(run.info.run_id, uri)
    params = {k: json.dumps(v) if isinstance(v, list) else v for k, v in _public_options(options).items()}
    run_logger.log_params(params)
    metrics = {}
    for r in report.summary:
        key = f"{safe_name(r.set)}/x{r.scale}/{safe_name(r.model)}"
        metrics[f"psnr/{key}"] = r.psnr
        metrics[f"ssim/{key}"] = r.ssim
    metrics["failed_images"] = float(len(report.failures))
    run_logger.log_metrics(metrics, step=0)
    run_logger.log_text(report.table, "results.md")
    for name in ("results.csv", "results.json", "failures.csv"):
        if name in report.files:
            run_logger.log_text(storage.read_bytes(report.files[name], options.storage).decode(), name)
    for label, png in grids.items():
        run_logger.log_image(np.asarray(decode_image(png).rgb), f"grid_{safe_name(label)}.png")
    run_logger.end("FAILED" if report.failures else "FINISHED")
    return run.info.run_id


# --------------------------------------------------------------------------------------------------------------------
# The whole run


def evaluate(options: EvaluationOptions) -> EvaluationReport:
    """Evaluate every model on every selected set and scale; write the outputs; log to MLflow if configured.

    Raises :class:`EvaluationError` (or another :class:`~edsr_ray.errors.EdsrRayError`) before computing anything
    when an input is wrong; images that fail while being evaluated are reported in the result instead.
    """
    start = time.perf_counter()
    cfg = options.storage
    _check_output(options.output)
    tracking_uri = options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if tracking_uri:
        from edsr_ray import tracking

        tracking_uri = tracking.resolve_tracking_uri(tracking_uri)
        tracking.check_tracking_uri(tracking_uri)
    specs = [ModelSpec.parse(m) for m in options.models]
    sets = select_sets(options.datasets, options.sets, cfg, limit=options.limit, exclude=options.output)
    models = resolve_models(specs, options.self_ensemble, cfg)
    learned = sorted({s for m in models if m.checkpoint is not None for s in m.scales})
    scales = sorted(set(options.scales)) if options.scales else (learned or list(SCALES))
    for m in models:
        if m.checkpoint is not None and not set(m.scales) & set(scales):
            raise EvaluationError(
                f"model {m.spec.label} ({m.spec.source}) upscales by {list(m.scales)}, none of the requested scales "
                f"{scales}"
            )
    # Only the scales some column has are read; the table still shows every requested scale (n/a where none has it).
    needed = [s for s in scales if any(s in m.scales for m in models)]
    items, problems = plan_items(sets, needed, options.protocol)
    if problems:
        raise EvaluationError(f"{len(problems)} problem(s) in the evaluation data: {_listing(problems)}")

    if options.use_ray:
        ensure_ray()
    columns = ", ".join(v.label for m in models for v in m.variants)
    logger.info("evaluating %s on %s at x%s", columns, ", ".join(s.name for s in sets), "/x".join(map(str, scales)))
    results = _run_items(items, models, options)

    # Table columns: plain models, then the "+" ones, as in the paper; models sharing a label share a column.
    variants = [v.label for m in models for v in m.variants if not v.self_ensemble]
    variants += [v.label for m in models for v in m.variants if v.self_ensemble]
    variants = list(dict.fromkeys(variants))
    order = {(it["set"], it["image"], it["scale"]): i for i, it in enumerate(items)}
    results.sort(key=lambda r: (variants.index(r.model), order.get((r.set, r.image, r.scale), 0)))
    protocols = {it["set"]: it["protocol"] for it in items}
    summary = summarize(results, protocols)
    set_names = table_order([s.name for s in sets])
    report = EvaluationReport(
        results=[r for r in results if r.status == "ok"],
        failures=[r for r in results if r.status != "ok"],
        summary=summary,
        table=markdown_table(summary, variants, set_names, scales),
        variants=variants,
    )
    write_outputs(report, options, models)
    grids = {}
    if options.grid > 0:
        bicubic = {m.spec.label for m in models if m.checkpoint is None}
        baseline = {(r.set, r.scale, r.image): r.psnr for r in report.results if r.model in bicubic}
        for label in variants:
            png = picture_grid([r for r in report.results if r.model == label], options.grid, baseline)
            if png is not None:
                grids[label] = png
                uri = _output_join(options.output, f"grid_{safe_name(label)}.png")
                storage.write_bytes(uri, png, cfg)
                report.files[f"grid_{safe_name(label)}.png"] = uri
    if tracking_uri:
        report.mlflow_run_id = log_to_mlflow(report, options, tracking_uri, grids)
    report.seconds = time.perf_counter() - start
    return report
