"""Evaluation sets: finding them at a location, and choosing the ones a run evaluates.

:func:`discover_sets` understands, at an ``s3://`` prefix or a local folder: an ingested root with
``manifest.parquet`` (:mod:`edsr_ray.manifest`); the same layout without a manifest (``benchmark/Set5/HR`` +
``LR_bicubic/X2``, ``DIV2K_valid_HR`` + ``DIV2K_valid_LR_bicubic/X2``, or a single set folder holding ``HR/``); or any
folder of HR images, whose LR inputs are made on the fly with the MATLAB-compatible
:func:`~edsr_ray.imaging.imresize` after cropping the HR image to a multiple of the scale. DIV2K sets use the
``div2k`` protocol (RGB, border scale + 6), all others the ``benchmark`` protocol (Y, border scale), as in the paper.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from edsr_ray import storage
from edsr_ray.codecs import IMAGE_SUFFIXES
from edsr_ray.config import SCALES
from edsr_ray.errors import EvaluationError
from edsr_ray.manifest import MANIFEST_NAME, read_manifest
from edsr_ray.storage import StorageConfig

# Row order of the paper's Table 3; other sets follow in the order they were found.
PAPER_SET_ORDER = ("Set5", "Set14", "B100", "Urban100", "DIV2K_valid")


_BENCH_HR = re.compile(r"^(?:(?P<prefix>.+)/)?HR/(?P<file>[^/]+)$")


_BENCH_LR = re.compile(r"^(?:(?P<prefix>.+)/)?LR_bicubic/X(?P<scale>\d)/(?P<file>[^/]+)$")


_DIV2K_HR = re.compile(r"^(?:(?P<prefix>.+)/)?DIV2K_(?P<split>[A-Za-z0-9]+)_HR/(?P<file>[^/]+)$")


_DIV2K_LR = re.compile(r"^(?:(?P<prefix>.+)/)?DIV2K_(?P<split>[A-Za-z0-9]+)_LR_bicubic/X(?P<scale>\d)/(?P<file>[^/]+)$")


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
