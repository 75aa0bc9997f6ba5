"""Ingest image collections into a dataset root in the DIV2K layout, with a Parquet manifest.

Sources (local folders or zip files, any mix) are recognised by their paths:

* DIV2K layout, as unpacked or inside the official zips: ``DIV2K_{train,valid}_HR/0001.png`` and
  ``DIV2K_{train,valid}_LR_bicubic/X{2,3,4}/0001x2.png``.
* Benchmark layout (Set5, Set14, B100, Urban100, any name): ``[NAME/]HR/baby.png`` and
  ``[NAME/]LR_bicubic/X2/babyx2.png``; the set is named by the folder above ``HR``, else by the source folder or zip.
  Its split is "test" (or ``split``) and its index the 1-based position of the id in sorted order.
* Any other image file is an HR image whose file stem becomes its id (DIV2K by default). DIV2K splits follow the
  numbers when stems are numbers (1-800 train, 801-900 valid, 901+ test), else ``split`` must say which.
* ``dataset`` (``--dataset``), when given, names every image of the run whatever its layout.

Written under the root (``s3://bucket/prefix`` or a folder)::

    DIV2K_train_HR/0001.png        DIV2K_train_LR_bicubic/X2/0001x2.png    (X3, X4; valid likewise)
    benchmark/Set5/HR/baby.png     benchmark/Set5/LR_bicubic/X2/babyx2.png
    manifest.parquet               one row per HR image (edsr_ray.manifest.MANIFEST_SCHEMA)

Every image is stored as an 8-bit RGB PNG written by fpng (by zlib past fpng's size limits, see
:func:`~edsr_ray.codecs.encode_image`): lossless, so its pixels are exactly the source's (EXIF orientation applied,
grey expanded, alpha dropped, 16 bit rounded), and libspng decodes it about twice as fast as a zlib-compressed PNG
such as DIV2K's originals - decoding is most of the cost of the patch stream (``benchmarks/bench_patches.py``). The
manifest keeps the checksum of each source file next to that of the object, and the sizes of the stored images.

Rules, so a run can be trusted:

* Missing LR images are made with the MATLAB-compatible :func:`~edsr_ray.imaging.imresize` from the HR image
  cropped (top-left) to a multiple of the scale, as the official benchmark code crops HR to LR x scale; the HR
  object itself is stored uncropped, and ``lr_x{s}_generated`` records which LR images were made this way.
  Where a source supplies LR images for a scale but lacks some, the missing ones are generated too and listed by
  name in the report, so a partial LR download still yields a complete, consistent dataset.
* A supplied LR image whose size is not floor(HR / scale), or that does not decode, is reported by name and left out
  (that scale of that image is null in the manifest); a corrupt HR image is reported and its image left out.
* Idempotent: a re-run skips every object whose source checksum matches the manifest and that exists (``verify``
  re-reads and re-hashes existing objects instead of trusting the listing), uploads what is missing or changed, and
  rewrites the manifest only when it changed.
* Nothing half-written: objects are written atomically (:func:`edsr_ray.storage.write_bytes`) and the manifest last.

The work runs as Ray tasks pinned to this node (the sources are local files), with a progress bar.

Memory: at most ``workers`` images are in flight, and each holds its source files (the HR file and the LR files the
sources supply for it, each refused past ``max_source_bytes``, default :data:`MAX_SOURCE_BYTES`; a zip member is
inflated :data:`ZIP_CHUNK_BYTES` at a time and never past the size its archive declares, whatever its data inflates
to), its decoded pixels (at most the decompression-bomb limit of 40 MP: a few hundred MB for a 16-bit image) and the
PNGs written from them. A run thus stays under about ``workers`` x ((1 + LR files per image) x ``max_source_bytes``
+ one decoded image); DIV2K's images (2K, PNGs of ~4 MB) need a few tens of MB each.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
import time
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from edsr_ray import manifest as manifest_lib
from edsr_ray import storage as storage_lib
from edsr_ray.codecs import IMAGE_SUFFIXES, decode_image, encode_image
from edsr_ray.config import SCALES
from edsr_ray.errors import EdsrRayError, ImageError, StorageError
from edsr_ray.imaging import imresize
from edsr_ray.infra.ray import ensure_ray
from edsr_ray.storage import StorageConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
# Sources are local folders or zip files (read by this node's tasks); the destination may be S3 too.
SOURCE_LOCATIONS = (storage_lib.LOCAL,)
# Largest source file (or zip member) read into memory by default (a 2K PNG is ~4 MB): guards against zip bombs and
# stray huge files; ``ingest(max_source_bytes=...)`` / ``--max-source-mb`` change it.
MAX_SOURCE_BYTES = 512 * 1024 * 1024
# Zip members are inflated this much at a time and stopped at the size their archive declares, so a member whose
# data inflates to far more than it declares costs at most one chunk, not its inflated size.
ZIP_CHUNK_BYTES = 1 << 20
# Compression methods read from archives. zipfile inflates bzip2 and LZMA data a whole compressed chunk at a time with
# no bound on the output, so members compressed that way are refused (image archives use deflate).
ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
_DIV2K_HR = re.compile(r"(?:^|/)DIV2K_(?P<split>train|valid|test)_HR/(?P<stem>[^/]+)\.\w+$")
_DIV2K_LR = re.compile(
    r"(?:^|/)DIV2K_(?P<split>train|valid|test)_LR_bicubic/X(?P<scale>\d)/(?P<stem>[^/]+)x(?P=scale)\.\w+$"
)
_BENCH_HR = re.compile(r"(?:^|/)(?:(?P<set>[^/]+)/)?HR/(?P<stem>[^/]+)\.\w+$")
_BENCH_LR = re.compile(r"(?:^|/)(?:(?P<set>[^/]+)/)?LR_bicubic/X(?P<scale>\d)/(?P<stem>[^/]+)x(?P=scale)\.\w+$")
# Folders of other degradations (LR_unknown, LR_mild, DIV2K_train_LR_x8, ...): never mistaken for HR images.
_OTHER_LAYOUT_DIR = re.compile(r"^(DIV2K_.*|LR.*)$", re.IGNORECASE)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_ID = re.compile(r"^[^/\\\x00-\x1f]+$")
_DIV2K_SPLIT_BASE = {"train": 0, "valid": 800, "test": 900}


# --------------------------------------------------------------------------------------------------------------------
# Finding the images in the sources


@dataclass(frozen=True)
class SourceFile:
    """A source image: a file on disk, or a member of a zip archive on disk."""

    path: str
    member: str | None = None

    @property
    def name(self) -> str:
        """How reports name it: the path, or ``archive.zip:member``."""
        return f"{self.path}:{self.member}" if self.member else self.path

    def read(self, limit: int = MAX_SOURCE_BYTES) -> bytes:
        """The file's bytes, refused past ``limit`` bytes (a zip member also past the size its archive declares)."""
        try:
            if self.member is None:
                try:  # only a regular file is read: a FIFO named like an image fails here instead of blocking
                    return storage_lib.read_bytes(self.path, max_bytes=limit)
                except StorageError as exc:
                    raise ImageError(str(exc)) from None
            return _read_member(self.path, self.member, limit)
        except (OSError, zipfile.BadZipFile, KeyError) as exc:
            raise ImageError(f"{self.name}: cannot read: {exc}") from None


def _read_member(path: str, member: str, limit: int) -> bytes:
    """One archive member, inflated :data:`ZIP_CHUNK_BYTES` at a time: memory holds at most what the archive declares
    for it (at most ``limit``; twice that while the pieces are joined) plus one chunk, whatever its data inflates to."""
    name = f"{path}:{member}"
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
        if info.compress_type not in ZIP_METHODS:
            methods = " and ".join(ZIP_METHODS.values())
            raise ImageError(
                f"{name}: compression method {info.compress_type} is not read; only {methods} members are (re-pack "
                "the archive with deflate)"
            )
        if info.flag_bits & 0x1:
            raise ImageError(f"{name}: the member is encrypted")
        if info.file_size > limit:
            raise ImageError(f"{name}: {info.file_size:,} bytes is larger than the {limit:,} allowed")
        parts, total = [], 0
        try:
            with archive.open(info) as stream:
                # zipfile stops at the declared size and then checks the CRC; the count is the guard of last resort.
                while chunk := stream.read(ZIP_CHUNK_BYTES):
                    total += len(chunk)
                    if total > info.file_size:
                        raise ImageError(f"{name}: inflates past the {info.file_size:,} bytes its archive declares")
                    parts.append(chunk)
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise ImageError(
                f"{name}: corrupt archive member: its data does not match the size ({info.file_size:,} bytes) and "
                f"checksum its archive declares ({exc})"
            ) from None
    if total != info.file_size:
        raise ImageError(f"{name}: the archive declares {info.file_size:,} bytes; its data holds {total:,}")
    return b"".join(parts)


@dataclass
class Item:
    """One HR image to ingest, with the LR images the sources supply for it."""

    dataset: str
    split: str
    id: str
    index: int | None
    hr: SourceFile
    lr: dict[int, SourceFile] = field(default_factory=dict)
    # Scales for which the source had an LR folder: a missing LR there is reported (then generated).
    lr_folders: set[int] = field(default_factory=set)

    @property
    def key(self) -> tuple[str, str]:
        return (self.dataset, self.id)


@dataclass(frozen=True)
class _Found:
    kind: str  # "hr" | "lr"
    dataset: str
    split: str | None  # None: decide from the number / the split option
    stem: str
    scale: int | None
    file: SourceFile
    div2k_layout: bool


def _list_source(source: str) -> tuple[str, list[SourceFile]]:
    """(label, image files) of one source: a folder walked recursively, or a zip file's members."""
    storage_lib.location_kind(source, SOURCE_LOCATIONS, what="--source")
    path = storage_lib.local_path(source).absolute()
    if path.is_dir():
        # The storage listing includes special files and links to folders named like images, so that reading each
        # fails by name (a FIFO never blocks a task, nothing named like an image vanishes); hidden files are skipped.
        files = []
        for uri in storage_lib.list_files(str(path), suffixes=IMAGE_SUFFIXES):
            if not any(part.startswith(".") or part == "__MACOSX" for part in Path(uri).relative_to(path).parts):
                files.append(SourceFile(uri))
        return path.name, files
    try:
        storage_lib.check_regular_file(path)  # a FIFO named .zip would block the zip reader
    except storage_lib.NotFoundError:
        raise EdsrRayError(f"--source {source}: no such folder or file") from None
    except StorageError as exc:
        raise EdsrRayError(f"--source {exc}") from None
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            members = [
                info.filename
                for info in archive.infolist()
                if not info.is_dir()
                and info.filename.lower().endswith(IMAGE_SUFFIXES)
                and not any(part.startswith(".") or part == "__MACOSX" for part in info.filename.split("/"))
            ]
        return path.stem, [SourceFile(str(path), m) for m in sorted(members)]
    if path.is_file():
        raise EdsrRayError(f"--source {source}: not a folder or a zip file")
    raise EdsrRayError(f"--source {source}: no such folder or file")


def _relative(file: SourceFile, source_root: str) -> str:
    if file.member is not None:
        return file.member
    return PurePosixPath(Path(file.path).relative_to(source_root).as_posix()).as_posix()


def _classify(rel: str, file: SourceFile, label: str, dataset: str | None) -> _Found | None:
    """What a file is, from its path inside the source; None for files of layouts this ingest does not handle."""
    if m := _DIV2K_HR.search(rel):
        return _Found("hr", dataset or manifest_lib.DIV2K, m["split"], m["stem"], None, file, True)
    if m := _DIV2K_LR.search(rel):
        return _Found("lr", dataset or manifest_lib.DIV2K, m["split"], m["stem"], int(m["scale"]), file, True)
    if m := _BENCH_LR.search(rel):
        return _Found("lr", dataset or m["set"] or label, None, m["stem"], int(m["scale"]), file, False)
    if m := _BENCH_HR.search(rel):
        return _Found("hr", dataset or m["set"] or label, None, m["stem"], None, file, False)
    if any(_OTHER_LAYOUT_DIR.match(part) for part in rel.split("/")[:-1]):
        return None
    return _Found("hr", dataset or manifest_lib.DIV2K, None, PurePosixPath(rel).stem, None, file, False)


def _div2k_split(stem: str) -> str | None:
    if not stem.isdigit():
        return None
    number = int(stem)
    return "train" if number <= 800 else "valid" if number <= 900 else "test"


def discover(
    sources: Sequence[str], *, dataset: str | None = None, split: str = "auto"
) -> tuple[list[Item], list[tuple[str, str]]]:
    """Pair up the HR and LR images of all sources into items; returns (items, (file, problem) found while pairing).

    Raises :class:`EdsrRayError` for mistakes that make the run meaningless: a missing source, two files claiming
    the same image, a DIV2K image whose split cannot be told.
    """
    if split not in ("auto", *SPLITS):
        raise EdsrRayError(f"split must be auto, train, valid or test, got {split!r}")
    if dataset is not None and not _NAME.match(dataset):
        raise EdsrRayError(f"dataset name {dataset!r} must be letters, digits, '_', '.', '+' or '-'")
    found: list[_Found] = []
    ignored = 0
    for source in sources:
        label, files = _list_source(source)
        root = str(storage_lib.local_path(source).absolute())
        for file in files:
            item = _classify(_relative(file, root), file, label, dataset)
            if item is None:
                ignored += 1
                log.debug("ignoring %s (a layout this ingest does not handle)", file.name)
            else:
                found.append(item)
    if ignored:
        log.info("ignored %d files in folders of other degradations (LR_unknown, ...)", ignored)

    problems: list[tuple[str, str]] = []
    items: dict[tuple[str, str], Item] = {}
    undecided: list[str] = []
    for f in (f for f in found if f.kind == "hr"):
        if not _NAME.match(f.dataset):
            raise EdsrRayError(f"{f.file.name}: dataset name {f.dataset!r} is not usable; pass --dataset NAME")
        if not _ID.match(f.stem) or f.stem.startswith("."):
            problems.append((f.file.name, "the file name cannot be used as an image id"))
            continue
        if f.dataset == manifest_lib.DIV2K:
            chosen = f.split or (split if split != "auto" else _div2k_split(f.stem))
            if chosen is None:
                undecided.append(f.file.name)
                continue
            index = int(f.stem) if f.stem.isdigit() else None
        else:
            chosen, index = (f.split or (split if split != "auto" else "test")), None
        key = (f.dataset, f.stem)
        if key in items:
            raise EdsrRayError(
                f"{f.dataset} image {f.stem!r} comes from two files: {items[key].hr.name} and {f.file.name}"
            )
        items[key] = Item(f.dataset, chosen, f.stem, index, f.file)
    if undecided:
        shown = ", ".join(undecided[:3]) + (f" and {len(undecided) - 3} more" if len(undecided) > 3 else "")
        raise EdsrRayError(
            f"cannot tell the DIV2K split of {shown}: the names are not DIV2K numbers; pass --split train (or valid)"
        )
    for f in (f for f in found if f.kind == "lr"):
        item = items.get((f.dataset, f.stem))
        if item is None:
            problems.append((f.file.name, f"LR image without an HR image ({f.dataset} {f.stem!r})"))
            continue
        if f.scale in item.lr:
            raise EdsrRayError(
                f"{f.dataset} {f.stem!r} x{f.scale} comes from two files: {item.lr[f.scale].name} and {f.file.name}"
            )
        item.lr[f.scale] = f.file
    # Which (dataset, split, scale) groups came with LR folders: their missing pairs are reported.
    with_lr = {(i.dataset, i.split, s) for i in items.values() for s in i.lr}
    for item in items.values():
        item.lr_folders = {s for s in SCALES if (item.dataset, item.split, s) in with_lr}
    return sorted(items.values(), key=lambda i: (i.dataset, i.split, i.id)), problems


def assign_indices(items: Iterable[Item], existing: Sequence[dict[str, Any]]) -> None:
    """Give every item without a number an ``index``: the one it had in the manifest, else the next free one.

    DIV2K numbers are their own index; other DIV2K ids count up from the split's first number (train 1, valid 801,
    test 901), other datasets from 1, in sorted id order, skipping indices already taken.
    """
    previous = {(r["dataset"], r["id"]): int(r["index"]) for r in existing}
    taken: dict[str, set[int]] = {}
    for r in existing:
        taken.setdefault(r["dataset"], set()).add(int(r["index"]))
    items = list(items)
    for item in items:
        if item.index is not None:
            taken.setdefault(item.dataset, set()).add(item.index)
    for item in sorted(items, key=lambda i: (i.dataset, i.id)):
        if item.index is not None:
            continue
        if item.key in previous:
            item.index = previous[item.key]
            continue
        used = taken.setdefault(item.dataset, set())
        index = (_DIV2K_SPLIT_BASE[item.split] if item.dataset == manifest_lib.DIV2K else 0) + 1
        while index in used:
            index += 1
        item.index = index
        used.add(index)


def object_keys(dataset: str, split: str, image_id: str, scales: Iterable[int]) -> tuple[str, dict[int, str]]:
    """Keys (relative to the root) of an image's HR object and its LR objects per scale."""
    if dataset == manifest_lib.DIV2K:
        hr = f"DIV2K_{split}_HR/{image_id}.png"
        lr = {s: f"DIV2K_{split}_LR_bicubic/X{s}/{image_id}x{s}.png" for s in scales}
    else:
        hr = f"benchmark/{dataset}/HR/{image_id}.png"
        lr = {s: f"benchmark/{dataset}/LR_bicubic/X{s}/{image_id}x{s}.png" for s in scales}
    return hr, lr


# --------------------------------------------------------------------------------------------------------------------
# One image (runs in a Ray task)


@dataclass(frozen=True)
class _Task:
    item: Item
    scales: tuple[int, ...]
    root: str
    previous: dict[str, Any] | None
    existing: frozenset[str]  # keys of this item's objects that the root already holds
    verify: bool
    storage: StorageConfig | None
    max_source_bytes: int = MAX_SOURCE_BYTES


@dataclass
class ItemResult:
    """What happened to one image: its manifest row (None if the HR image failed) and the counts."""

    name: str
    row: dict[str, Any] | None = None
    uploaded: int = 0
    uploaded_bytes: int = 0
    skipped: int = 0
    generated: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)
    missing_lr: list[str] = field(default_factory=list)  # names of LR images generated where a source lacked them


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _to_rgb8(image: Any) -> np.ndarray:
    rgb = image.rgb
    if rgb.dtype == np.uint16:
        rgb = ((rgb.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    return rgb


class _Writer:
    """Writes objects unless an identical one is already there, counting for the report."""

    def __init__(self, task: _Task, result: ItemResult):
        self.task, self.result = task, result

    def present(self, key: str, sha: str | None) -> bool:
        """Is an object with this checksum already stored at ``key``?"""
        if sha is None or key not in self.task.existing:
            return False
        if not self.task.verify:
            return True
        try:
            return _sha256(storage_lib.read_bytes(storage_lib.join(self.task.root, key), self.task.storage)) == sha
        except storage_lib.NotFoundError:
            return False

    def put(self, key: str, data: bytes, previous_sha: str | None) -> str:
        sha = _sha256(data)
        if previous_sha == sha and self.present(key, sha):
            self.result.skipped += 1
        else:
            storage_lib.write_bytes(storage_lib.join(self.task.root, key), data, self.task.storage)
            self.result.uploaded += 1
            self.result.uploaded_bytes += len(data)
        return sha


def ingest_item(task: _Task) -> ItemResult:
    """Validate, convert, generate and upload one HR image and its LR images; never raises for bad images."""
    item, prev = task.item, task.previous or {}
    result = ItemResult(item.hr.name)
    writer = _Writer(task, result)
    hr_key, lr_keys = object_keys(item.dataset, item.split, item.id, task.scales)

    def old(scale: int, name: str) -> Any:
        return prev.get(manifest_lib.lr_column(scale, name))

    try:
        hr_source = item.hr.read(task.max_source_bytes)
    except ImageError as exc:
        result.failed.append((item.hr.name, str(exc)))
        return result
    hr_source_sha = _sha256(hr_source)
    same_hr = prev.get("hr_key") == hr_key and prev.get("hr_source_sha256") == hr_source_sha
    lr_sources: dict[int, bytes] = {}
    for scale in (s for s in task.scales if s in item.lr):
        try:
            lr_sources[scale] = item.lr[scale].read(task.max_source_bytes)
        except ImageError as exc:
            result.failed.append((item.lr[scale].name, str(exc)))

    def reusable(scale: int) -> bool:
        """The manifest's LR at this scale was made from these same sources and is stored."""
        if not same_hr or old(scale, "key") != lr_keys[scale]:
            return False
        if scale in item.lr:
            made_from_source = (
                scale in lr_sources
                and old(scale, "generated") is False
                and old(scale, "source_sha256") == _sha256(lr_sources[scale])
            )
        else:
            made_from_source = old(scale, "generated") is True
        return made_from_source and writer.present(lr_keys[scale], old(scale, "sha256"))

    pending = [s for s in task.scales if not reusable(s)]
    hr_kept = same_hr and writer.present(hr_key, prev.get("hr_sha256"))
    row: dict[str, Any] = {
        "dataset": item.dataset,
        "split": item.split,
        "id": item.id,
        "index": item.index,
        "hr_key": hr_key,
        "hr_source_sha256": hr_source_sha,
    }
    hr_rgb = None
    if hr_kept and not pending:
        row.update(hr_width=prev["hr_width"], hr_height=prev["hr_height"], hr_sha256=prev["hr_sha256"])
        result.skipped += 1
    else:
        try:
            decoded = decode_image(hr_source, name=item.hr.name)
        except ImageError as exc:
            result.failed.append((item.hr.name, f"corrupt image: {exc}"))
            return result
        hr_rgb = _to_rgb8(decoded)  # (H, W, 3) uint8
        if hr_kept:
            result.skipped += 1
            sha = prev["hr_sha256"]
        else:
            previous_sha = prev.get("hr_sha256") if prev.get("hr_key") == hr_key else None
            sha = writer.put(hr_key, encode_image(hr_rgb), previous_sha)
        row.update(hr_width=decoded.width, hr_height=decoded.height, hr_sha256=sha)

    width, height = int(row["hr_width"]), int(row["hr_height"])
    for scale in task.scales:
        if scale not in pending:
            row.update({manifest_lib.lr_column(scale, f): old(scale, f) for f in manifest_lib.LR_FIELDS})
            result.skipped += 1
            continue
        lw, lh = width // scale, height // scale
        if lw < 1 or lh < 1:
            result.failed.append((item.hr.name, f"{width}x{height} is too small for x{scale}"))
            continue
        if scale in item.lr:
            if scale not in lr_sources:
                continue  # unreadable, already reported
            name = item.lr[scale].name
            try:
                lr = decode_image(lr_sources[scale], name=name)
            except ImageError as exc:
                result.failed.append((name, f"corrupt image: {exc}"))
                continue
            if (lr.width, lr.height) != (lw, lh):
                result.failed.append(
                    (name, f"LR is {lr.width}x{lr.height}, expected {lw}x{lh} (HR {width}x{height} / {scale})")
                )
                continue
            pixels, source_sha = _to_rgb8(lr), _sha256(lr_sources[scale])
        else:
            assert hr_rgb is not None  # pending LR work always decodes the HR image
            # MATLAB-style bicubic of the HR image cropped to a multiple of the scale: (lh, lw, 3). output_shape
            # rather than 1/scale: MATLAB's ceil(size * (1/scale)) can round up by one pixel.
            pixels, source_sha = imresize(hr_rgb[: lh * scale, : lw * scale], output_shape=(lh, lw)), None
            result.generated += 1
            if scale in item.lr_folders:
                result.missing_lr.append(f"{item.hr.name} x{scale}")
        key = lr_keys[scale]
        sha = writer.put(key, encode_image(pixels), old(scale, "sha256") if old(scale, "key") == key else None)
        values = {"key": key, "width": lw, "height": lh, "sha256": sha, "generated": source_sha is None}
        row.update({manifest_lib.lr_column(scale, f): v for f, v in values.items()})
        row[manifest_lib.lr_column(scale, "source_sha256")] = source_sha
    # Scales not asked for this time keep what the manifest had, as long as the HR image is the same.
    if same_hr:
        for scale in (s for s in SCALES if s not in task.scales and old(s, "key") is not None):
            row.update({manifest_lib.lr_column(scale, f): old(scale, f) for f in manifest_lib.LR_FIELDS})
    result.row = row
    return result


# --------------------------------------------------------------------------------------------------------------------
# The whole run


@dataclass
class IngestReport:
    """Summary of one ingest run."""

    dest: str
    images: int = 0
    ok: int = 0
    uploaded: int = 0
    uploaded_bytes: int = 0
    skipped: int = 0
    generated: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    missing_lr: list[str] = field(default_factory=list)
    manifest_written: bool = False
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [
            f"ingest into {self.dest}: {self.images} images ({self.ok} ok) in {self.seconds:.1f} s",
            f"  uploaded {self.uploaded} objects ({self.uploaded_bytes / 1e6:.1f} MB), skipped {self.skipped} "
            f"unchanged, generated {self.generated} LR images",
            f"  manifest: {'written' if self.manifest_written else 'unchanged'}",
        ]
        if self.missing_lr:
            lines.append(f"  {len(self.missing_lr)} LR images missing from the source folders were generated:")
            lines += [f"    {name}" for name in self.missing_lr]
        if self.failed:
            lines.append(f"  {len(self.failed)} failed:")
            lines += [f"    {name}: {reason}" for name, reason in self.failed]
        return "\n".join(lines)


def _existing_rows(root: str, cfg: StorageConfig | None) -> list[dict[str, Any]]:
    import pandas as pd

    try:
        manifest = manifest_lib.read_manifest(root, cfg)
    except EdsrRayError as exc:
        if not storage_lib.exists(manifest_lib.manifest_uri(root), cfg):
            return []
        raise EdsrRayError(f"{exc}; move it away to start a fresh dataset") from None
    rows = manifest.astype(object).to_dict("records")
    return [{k: (None if v is pd.NA else v) for k, v in row.items()} for row in rows]


def _listing(root: str, cfg: StorageConfig | None) -> set[str]:
    """Keys (relative to root) of every object under the root."""
    try:
        uris = storage_lib.list_files(root, cfg)
    except storage_lib.NotFoundError:
        if storage_lib.is_s3(root):
            raise
        return set()  # a local destination folder that does not exist yet
    prefix = root.rstrip("/") + "/"
    return {uri[len(prefix) :] for uri in uris if uri.startswith(prefix)}


def ingest(
    sources: Sequence[str],
    dest: str,
    *,
    scales: Sequence[int] = SCALES,
    dataset: str | None = None,
    split: str = "auto",
    workers: int | None = None,
    verify: bool = False,
    storage: StorageConfig | None = None,
    progress: bool = True,
    max_source_bytes: int = MAX_SOURCE_BYTES,
) -> IngestReport:
    """Ingest ``sources`` into the dataset root ``dest``; see the module docstring for the rules.

    ``workers``: images processed at once (default: twice the cluster's CPUs; each task reserves half a CPU, as it
    waits on storage part of the time). ``max_source_bytes``: the largest source file or zip member read; larger
    ones fail by name. Both bound the run's memory (module docstring). Uses the current Ray connection, or starts a
    local Ray.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from tqdm import tqdm

    started = time.perf_counter()
    scales = tuple(sorted({int(s) for s in scales}))
    if not scales or any(s not in SCALES for s in scales):
        raise EdsrRayError(f"scales must be a non-empty subset of {list(SCALES)}, got {list(scales)}")
    if not sources:
        raise EdsrRayError("no --source given")
    if max_source_bytes < 1:
        raise EdsrRayError(f"max_source_bytes must be >= 1, got {max_source_bytes}")
    for source in sources:  # every location is checked before anything is read or written
        storage_lib.location_kind(source, SOURCE_LOCATIONS, what="--source")
    if storage_lib.location_kind(dest, storage_lib.DATA_LOCATIONS, what="--dest") == storage_lib.S3:
        dest = str(dest).rstrip("/")
    else:
        dest = str(storage_lib.local_path(dest).absolute())
    items, problems = discover(sources, dataset=dataset, split=split)
    report = IngestReport(dest, images=len(items))
    report.failed += problems
    existing_rows = _existing_rows(dest, storage)
    assign_indices(items, existing_rows)
    previous = {(r["dataset"], r["id"]): r for r in existing_rows}
    present = _listing(dest, storage)
    log.info("ingesting %d images from %d sources into %s (scales %s)", len(items), len(sources), dest, list(scales))

    ensure_ray()
    node = ray.get_runtime_context().get_node_id()
    remote = ray.remote(ingest_item).options(
        num_cpus=0.5, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False), max_retries=1
    )
    if workers is None:
        workers = max(1, int(2 * ray.cluster_resources().get("CPU", 1)))
    rows = {key: row for key, row in previous.items()}
    pending: dict[Any, Item] = {}
    queue = list(items)
    with tqdm(total=len(items), unit="img", desc="ingest", disable=not progress, file=sys.stderr) as bar:
        while queue or pending:
            while queue and len(pending) < workers:
                item = queue.pop(0)
                hr_key, lr_keys = object_keys(item.dataset, item.split, item.id, scales)
                keys = frozenset(k for k in (hr_key, *lr_keys.values()) if k in present)
                task = _Task(item, scales, dest, previous.get(item.key), keys, verify, storage, max_source_bytes)
                pending[remote.remote(task)] = item
            done, _ = ray.wait(list(pending), num_returns=1)
            item = pending.pop(done[0])
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if isinstance(exc.cause, EdsrRayError) else exc
                result = ItemResult(item.hr.name, failed=[(item.hr.name, str(cause).splitlines()[0])])
            bar.update(1)
            _account(report, result)
            if result.row is not None:
                rows[item.key] = result.row

    new_rows = sorted(rows.values(), key=lambda r: (r["dataset"], int(r["index"]), r["id"]))
    if _rows_differ(new_rows, existing_rows):
        manifest_lib.write_manifest(new_rows, dest, storage)
        report.manifest_written = True
    report.seconds = time.perf_counter() - started
    return report


def _account(report: IngestReport, result: ItemResult) -> None:
    report.ok += result.row is not None
    report.uploaded += result.uploaded
    report.uploaded_bytes += result.uploaded_bytes
    report.skipped += result.skipped
    report.generated += result.generated
    report.failed += result.failed
    report.missing_lr += result.missing_lr
    for name, reason in result.failed:
        log.warning("%s: %s", name, reason)


def _rows_differ(new: list[dict[str, Any]], old: list[dict[str, Any]]) -> bool:
    """Compare as the manifest would store them (typed table), so a re-run with nothing new writes nothing."""
    if len(new) != len(old):
        return True
    key = lambda r: (r["dataset"], r["id"])  # noqa: E731
    table = manifest_lib.manifest_table
    return not table(sorted(new, key=key)).equals(table(sorted(old, key=key)))
