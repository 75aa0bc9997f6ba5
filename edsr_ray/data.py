"""The dataset manifest and the Ray Data stream of aligned LR/HR training patches.

A dataset root (``s3://bucket/prefix`` or a folder) written by ``jobs/ingest.py`` holds the images in the DIV2K layout
and ``manifest.parquet`` with one row per HR image (see :data:`MANIFEST_COLUMNS`). This module reads that manifest
and turns it into what training needs:

* :func:`patch_dataset` - a ``ray.data.Dataset`` of ``epoch_patches`` random aligned patch pairs: ``lr`` uint8
  (P, P, 3), ``hr`` uint8 (P*s, P*s, 3) cut at the same place, ``scale``. Every pass over it (every
  ``iter_batches`` / ``iter_torch_batches`` call, i.e. every epoch) cuts fresh crops.
* :func:`iter_training_batches` - what a Ray Train worker loops over: single-scale float batches on its device,
  mixed across images by a small shuffle pool, the same number of batches on every rank.
* :func:`validation_images` - whole (or centre-cropped) validation images for rank 0.

Speed: decoding a 2K PNG costs ~30-50 ms, cutting a patch ~60 µs, so each read task decodes one HR/LR pair and cuts
``patches_per_image`` patches from it: ~800 patches per CPU-second against ~17 for one decode per patch
(``benchmarks/bench_patches.py``; 16 cores give about twice the ~6800 patches/s an H200 trains the x2 baseline at).
Decoded images are deliberately not cached: decoding is ~70% of the read work, so a cache could win at most ~3x, for
~10 MB of memory per image and scale (8+ GB for DIV2K), while the stream already has the margin it needs.

Randomness: the epoch's plan (which images, which scale, every crop) is drawn when Ray Data asks the datasource for
its read tasks, which happens once per execution, in the one process that drives the execution (the driver, or the
split coordinator that feeds all Ray Train ranks). Ranks therefore receive disjoint parts of one plan instead of
replaying the same random sequence, and each epoch differs from the last. With ``seed=None`` every plan is drawn from
fresh OS entropy (a restarted job does not replay its crops); with an integer seed the sequence of epochs is
reproducible for a given sequence of reads.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import secrets
import struct
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pyarrow as pa
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from edsr_ray import storage as storage_lib
from edsr_ray.config import SCALES, DataConfig
from edsr_ray.errors import EdsrRayError, ImageError, ImageTooLargeError
from edsr_ray.imaging import MAX_PIXELS_DEFAULT, decode_image
from edsr_ray.storage import StorageConfig

if TYPE_CHECKING:
    import pandas as pd
    import ray.data
    import torch

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.parquet"
DIV2K = "DIV2K"
# Column order of manifest.parquet. Keys are relative to the dataset root; LR columns are null where an image has no
# LR at that scale. ``*_sha256`` is the checksum of the stored object, ``*_source_sha256`` that of the file it was made
# from (so a re-run skips unchanged sources without decoding them). ``lr_x{s}_generated`` is true where ingest made
# the LR with imresize from the HR image cropped to a multiple of s (top-left aligned, as the benchmark code does;
# its source is the HR file).
_BASE_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("dataset", pa.string()),
    ("split", pa.string()),
    ("id", pa.string()),
    ("index", pa.int32()),
    ("hr_key", pa.string()),
    ("hr_width", pa.int32()),
    ("hr_height", pa.int32()),
    ("hr_sha256", pa.string()),
    ("hr_source_sha256", pa.string()),
)
_LR_TYPES: tuple[tuple[str, pa.DataType], ...] = (
    ("key", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("sha256", pa.string()),
    ("generated", pa.bool_()),
    ("source_sha256", pa.string()),
)
LR_FIELDS = tuple(name for name, _ in _LR_TYPES)


def lr_column(scale: int, field: str) -> str:
    """Name of a per-scale manifest column, e.g. ``lr_column(2, "key") == "lr_x2_key"``."""
    return f"lr_x{scale}_{field}"


MANIFEST_SCHEMA = pa.schema(
    [pa.field(name, dtype, nullable=False) for name, dtype in _BASE_COLUMNS]
    + [pa.field(lr_column(s, f), dtype, nullable=True) for s in SCALES for f, dtype in _LR_TYPES]
)
MANIFEST_COLUMNS = tuple(MANIFEST_SCHEMA.names)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Read tasks per epoch at most; longer epochs put several images in one task.
MAX_READ_TASKS = 2000


# --------------------------------------------------------------------------------------------------------------------
# Manifest


def manifest_uri(root: str) -> str:
    """Where the manifest of a dataset root lives."""
    return storage_lib.join(root, MANIFEST_NAME)


def manifest_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Manifest rows (dicts keyed by :data:`MANIFEST_COLUMNS`; missing LR columns are null) as a typed table."""
    rows = list(rows)
    columns = {name: [row.get(name) for row in rows] for name in MANIFEST_COLUMNS}
    return pa.Table.from_pydict(columns, schema=MANIFEST_SCHEMA)


def write_manifest(rows: Iterable[dict[str, Any]], root: str, cfg: StorageConfig | None = None) -> str:
    """Write ``manifest.parquet`` under ``root`` atomically (readers see the old or the new one); returns its URI."""
    import pyarrow.parquet as pq

    table = manifest_table(rows).sort_by([("dataset", "ascending"), ("index", "ascending"), ("id", "ascending")])
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    uri = manifest_uri(root)
    storage_lib.write_bytes(uri, buffer.getvalue(), cfg)
    return uri


def read_manifest(root: str, cfg: StorageConfig | None = None) -> pd.DataFrame:
    """The manifest of a dataset root as a DataFrame (nullable dtypes: missing LR columns hold ``<NA>``).

    Raises :class:`EdsrRayError` naming the root when there is no manifest (nothing ingested there yet) or it is not
    a manifest written by this project.
    """
    import pandas as pd
    import pyarrow.parquet as pq

    if not root:
        raise EdsrRayError("data.root is empty: set it to the dataset root written by jobs/ingest.py")
    uri = manifest_uri(root)
    try:
        data = storage_lib.read_bytes(uri, cfg)
    except storage_lib.NotFoundError:
        raise EdsrRayError(
            f"no dataset at {root}: {MANIFEST_NAME} not found; create it with "
            f"`python jobs/ingest.py --source ... --dest {root}`"
        ) from None
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as exc:
        raise EdsrRayError(f"{uri} is not a readable Parquet file: {exc}") from None
    missing = [name for name in MANIFEST_COLUMNS if name not in table.column_names]
    if missing:
        raise EdsrRayError(f"{uri} is not an edsr-ray manifest: missing columns {missing}")
    table = table.select(list(MANIFEST_COLUMNS)).cast(MANIFEST_SCHEMA)
    mapping = {pa.string(): pd.StringDtype(), pa.int32(): pd.Int32Dtype(), pa.bool_(): pd.BooleanDtype()}
    return table.to_pandas(types_mapper=mapping.get)


def select(
    manifest: pd.DataFrame,
    dataset: str = DIV2K,
    index_range: tuple[int, int] | None = None,
    scale: int | None = None,
    *,
    split: str | None = None,
) -> pd.DataFrame:
    """Rows of one dataset, optionally within an inclusive ``index`` range, of one split, and having LR at ``scale``.

    For DIV2K the index is the image number, so the paper's ranges apply directly: train ``(1, 800)``, validation
    ``(801, 810)``. Rows come back sorted by index.
    """
    mask = manifest["dataset"] == dataset
    if index_range is not None:
        lo, hi = index_range
        mask &= (manifest["index"] >= lo) & (manifest["index"] <= hi)
    if split is not None:
        mask &= manifest["split"] == split
    if scale is not None:
        if scale not in SCALES:
            raise EdsrRayError(f"scale {scale} is not supported; choose from {list(SCALES)}")
        mask &= manifest[lr_column(scale, "key")].notna()
    return manifest[mask.fillna(False).astype(bool)].sort_values("index", kind="stable").reset_index(drop=True)


def _range_for(cfg: DataConfig, split: str, dataset: str) -> tuple[int, int] | None:
    """Index range of a split: DIV2K uses the config's ranges; other sets (benchmarks) are used whole."""
    if dataset != DIV2K:
        return None
    if split == "train":
        return cfg.train_range
    if split == "valid":
        return cfg.val_range
    raise EdsrRayError(f"split must be 'train' or 'valid' for {DIV2K}, got {split!r}")


def check_dataset(
    cfg: DataConfig, scales: Sequence[int], *, storage: StorageConfig | None = None, dataset: str = DIV2K
) -> dict[str, int]:
    """Fail fast, before any cluster work, when the data cannot feed training: no manifest, or a range or scale with
    no usable image (LR smaller than the patch). Returns the number of images per ``{split}_x{scale}``."""
    manifest = read_manifest(cfg.root, storage)
    counts = {}
    for split in ("train", "valid"):
        index_range = _range_for(cfg, split, dataset)
        for scale in scales:
            rows = select(manifest, dataset, index_range, scale)
            if split == "train":
                rows = rows[_fits(rows, scale, cfg.patch_size)]
            counts[f"{split}_x{scale}"] = len(rows)
            if not len(rows):
                what = f"index range {list(index_range)}" if index_range else "the dataset"
                need = f" with LR of at least {cfg.patch_size}x{cfg.patch_size} pixels" if split == "train" else ""
                raise EdsrRayError(
                    f"{cfg.root}: no {dataset} image in {what} for {split} at x{scale}{need} "
                    f"(manifest has {len(select(manifest, dataset))} {dataset} images); check data.{split}_range "
                    f"{'' if split == 'train' else '(data.val_range) '}and the scales ingested"
                )
    return counts


def _fits(rows: pd.DataFrame, scale: int, patch_size: int) -> Any:
    return (rows[lr_column(scale, "width")] >= patch_size) & (rows[lr_column(scale, "height")] >= patch_size)


# --------------------------------------------------------------------------------------------------------------------
# Decoding and cutting


def decode_rgb8(data: bytes, name: str, *, max_pixels: int = MAX_PIXELS_DEFAULT) -> np.ndarray:
    """(H, W, 3) uint8 pixels of a dataset image.

    Ingest stores every image as an 8-bit RGB PNG, which goes straight to libspng (pyspng; ~2.5x faster than
    Pillow on a 2K photo) after a header check against ``max_pixels``. Anything else takes the general
    :func:`~edsr_ray.imaging.decode_image` path (16-bit rounded to 8 bit, grey expanded, alpha ignored).
    """
    if data[:8] == _PNG_SIGNATURE and len(data) >= 33 and data[12:16] == b"IHDR":
        width, height, bit_depth, color_type = struct.unpack(">IIBB", data[16:26])
        if width * height > max_pixels:
            raise ImageTooLargeError(f"{name}: {width}x{height} exceeds the limit of {max_pixels:,} pixels")
        if bit_depth == 8 and color_type == 2:
            import pyspng

            try:
                pixels = pyspng.load(data)  # (H, W, 3) uint8
            except RuntimeError as exc:
                raise ImageError(f"{name}: corrupt PNG: {exc}") from None
            if pixels.shape == (height, width, 3):
                return pixels
    image = decode_image(data, name=name, max_pixels=max_pixels)
    rgb = image.rgb
    if rgb.dtype == np.uint16:
        rgb = ((rgb.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    return rgb


def apply_transform(patch: np.ndarray, code: int) -> np.ndarray:
    """One of the 8 flips/rotations of an (H, W, C) patch: bit 2 transposes, bit 0 flips left-right, bit 1 up-down.

    Returns a view; the same code applied to the LR and HR patch keeps them aligned.
    """
    if code & 4:
        patch = patch.swapaxes(0, 1)
    if code & 1:
        patch = patch[:, ::-1]
    if code & 2:
        patch = patch[::-1]
    return patch


def invert_transform(patch: np.ndarray, code: int) -> np.ndarray:
    """Undo :func:`apply_transform` (flips first, then the transpose)."""
    if code & 2:
        patch = patch[::-1]
    if code & 1:
        patch = patch[:, ::-1]
    if code & 4:
        patch = patch.swapaxes(0, 1)
    return patch


class Patches(NamedTuple):
    """Aligned patches cut from one LR/HR pair, with where they came from (for tests and debugging)."""

    lr: np.ndarray  # (N, P, P, 3) uint8
    hr: np.ndarray  # (N, P*s, P*s, 3) uint8
    positions: np.ndarray  # (N, 2) top-left (y, x) in LR pixels; the HR patch starts at (y*s, x*s)
    transforms: np.ndarray  # (N,) apply_transform codes (all 0 without augmentation)


def cut_patches(
    lr: np.ndarray,
    hr: np.ndarray,
    scale: int,
    count: int,
    patch_size: int,
    rng: np.random.Generator,
    *,
    augment: bool = True,
) -> Patches:
    """Cut ``count`` random aligned pairs: LR (P, P) at (y, x) and HR (P*s, P*s) at (y*s, x*s), same flip/rotation.

    ``hr`` must cover at least ``lr`` x ``scale`` from its top-left corner (extra HR rows/columns beyond that, as in
    HR images whose size is not a multiple of the scale, are never used).
    """
    lh, lw = lr.shape[:2]
    if hr.shape[0] < lh * scale or hr.shape[1] < lw * scale:
        raise ImageError(f"HR {hr.shape[1]}x{hr.shape[0]} is smaller than LR {lw}x{lh} times {scale}")
    if lh < patch_size or lw < patch_size:
        raise ImageError(f"LR {lw}x{lh} is smaller than the {patch_size}x{patch_size} patch")
    p, hp = patch_size, patch_size * scale
    ys = rng.integers(0, lh - p + 1, size=count)
    xs = rng.integers(0, lw - p + 1, size=count)
    codes = rng.integers(0, 8, size=count) if augment else np.zeros(count, dtype=np.int64)
    out_lr = np.empty((count, p, p, 3), dtype=np.uint8)  # (N, P, P, 3)
    out_hr = np.empty((count, hp, hp, 3), dtype=np.uint8)  # (N, P*s, P*s, 3)
    for i, (y, x, code) in enumerate(zip(ys.tolist(), xs.tolist(), codes.tolist())):
        out_lr[i] = apply_transform(lr[y : y + p, x : x + p], code)
        out_hr[i] = apply_transform(hr[y * scale : y * scale + hp, x * scale : x * scale + hp], code)
    return Patches(out_lr, out_hr, np.stack([ys, xs], axis=1), codes)


# --------------------------------------------------------------------------------------------------------------------
# The patch datasource


@dataclass(frozen=True)
class _Image:
    """One LR/HR pair usable at one scale (what a read task needs to fetch and check it)."""

    hr_uri: str
    lr_uri: str
    lr_width: int
    lr_height: int


@dataclass(frozen=True)
class _Unit:
    """One read task: decode one pair, cut ``count`` patches with the RNG seeded by ``(entropy, number)``."""

    image: _Image
    scale: int
    count: int
    entropy: int
    number: int


def _read_unit(unit: _Unit, patch_size: int, augment: bool, cfg: StorageConfig | None) -> Any:
    """Fetch + decode one LR/HR pair and cut the unit's patches into one block (runs in a Ray Data read task)."""
    image, s = unit.image, unit.scale
    hr = decode_rgb8(storage_lib.read_bytes(image.hr_uri, cfg), image.hr_uri)
    lr = decode_rgb8(storage_lib.read_bytes(image.lr_uri, cfg), image.lr_uri)
    if lr.shape[:2] != (image.lr_height, image.lr_width):
        raise ImageError(
            f"{image.lr_uri}: {lr.shape[1]}x{lr.shape[0]} but the manifest says {image.lr_width}x{image.lr_height}; "
            "re-run the ingest"
        )
    rng = np.random.default_rng(np.random.SeedSequence(unit.entropy, spawn_key=(1, unit.number)))
    try:
        patches = cut_patches(lr, hr, s, unit.count, patch_size, rng, augment=augment)
    except ImageError as exc:
        raise ImageError(f"{image.hr_uri} / {image.lr_uri}: {exc}") from None
    batch = {"lr": patches.lr, "hr": patches.hr, "scale": np.full(unit.count, s, dtype=np.int64)}
    return BlockAccessor.batch_to_block(batch)


def _read_units(units: Sequence[_Unit], patch_size: int, augment: bool, cfg: StorageConfig | None) -> Iterator[Any]:
    for unit in units:
        yield _read_unit(unit, patch_size, augment, cfg)


class PatchDatasource(Datasource):
    """Ray Data source of random aligned patch pairs; each execution (epoch) draws a new plan.

    The plan: ``ceil(epoch_patches / patches_per_image)`` units, scales dealt out as evenly as possible in random
    order (so in MDSR mode every scale gets the same share of each epoch), images taken per scale from a fresh random
    permutation (every image is used before any repeats); each unit is one block of patches and, up to
    :data:`MAX_READ_TASKS` per epoch, one read task.
    """

    def __init__(
        self,
        images: dict[int, list[_Image]],
        *,
        epoch_patches: int,
        patches_per_image: int,
        patch_size: int,
        augment: bool,
        seed: int | None,
        storage: StorageConfig | None,
    ):
        super().__init__()
        self._images = images
        self._epoch_patches = epoch_patches
        self._per_image = patches_per_image
        self._patch_size = patch_size
        self._augment = augment
        self._seed = seed
        self._storage = storage
        # Executions so far. A one-element list so that shallow copies of this object (which Ray's planner may make)
        # keep counting together; a new plan per call is what makes every epoch's crops fresh.
        self._calls = [0]

    @property
    def scales(self) -> tuple[int, ...]:
        return tuple(self._images)

    def num_units(self) -> int:
        return math.ceil(self._epoch_patches / self._per_image)

    def estimate_inmemory_data_size(self) -> int:
        per_patch = np.mean([3 * self._patch_size**2 * (1 + s * s) for s in self._images])
        return int(self._epoch_patches * per_patch)

    def plan(self, entropy: int) -> list[_Unit]:
        """The units of one epoch, fully determined by ``entropy``."""
        rng = np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(0,)))
        n = self.num_units()
        counts = [self._per_image] * (n - 1) + [self._epoch_patches - self._per_image * (n - 1)]
        scales = list(self._images)
        unit_scales = [scales[i] for i in rng.permutation(np.arange(n) % len(scales)).tolist()]
        queues: dict[int, list[int]] = {s: [] for s in scales}
        units = []
        for number, (scale, count) in enumerate(zip(unit_scales, counts)):
            if not queues[scale]:
                queues[scale] = rng.permutation(len(self._images[scale])).tolist()
            image = self._images[scale][queues[scale].pop()]
            units.append(_Unit(image, scale, count, entropy, number))
        return units

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        call = self._calls[0]
        self._calls[0] += 1
        # A 128-bit entropy per plan: from the seed and the call number (reproducible), or from the OS.
        entropy = self._seed * 2**64 + call if self._seed is not None else secrets.randbits(128)
        units = self.plan(entropy)
        # One unit per read task, unless an epoch is so long that scheduling that many tasks would cost more than
        # it spreads: then consecutive units share a task (each still one block).
        per_task = math.ceil(len(units) / MAX_READ_TASKS)
        size = self.estimate_inmemory_data_size() / self._epoch_patches
        tasks = []
        for start in range(0, len(units), per_task):
            group = units[start : start + per_task]
            rows = sum(u.count for u in group)
            meta = BlockMetadata(num_rows=rows, size_bytes=int(size * rows), input_files=None, exec_stats=None)
            fn = functools.partial(_read_units, group, self._patch_size, self._augment, self._storage)
            tasks.append(ReadTask(fn, meta, per_task_row_limit=per_task_row_limit))
        return tasks


def _image_table(
    cfg: DataConfig,
    scales: Sequence[int],
    split: str,
    dataset: str,
    storage: StorageConfig | None,
) -> dict[int, list[_Image]]:
    manifest = read_manifest(cfg.root, storage)
    index_range = _range_for(cfg, split, dataset)
    images: dict[int, list[_Image]] = {}
    for scale in scales:
        rows = select(manifest, dataset, index_range, scale)
        too_small = len(rows) - int(_fits(rows, scale, cfg.patch_size).sum())
        rows = rows[_fits(rows, scale, cfg.patch_size)]
        if too_small:
            log.warning(
                "x%d: skipping %d images whose LR is smaller than the %d px patch", scale, too_small, cfg.patch_size
            )
        if not len(rows):
            what = f"index range {list(index_range)}" if index_range else "the dataset"
            raise EdsrRayError(
                f"{cfg.root}: no {dataset} image in {what} has an LR image at x{scale} of at least "
                f"{cfg.patch_size}x{cfg.patch_size} pixels"
            )
        images[scale] = [
            _Image(
                storage_lib.join(cfg.root, row["hr_key"]),
                storage_lib.join(cfg.root, row[lr_column(scale, "key")]),
                int(row[lr_column(scale, "width")]),
                int(row[lr_column(scale, "height")]),
            )
            for row in rows.to_dict("records")
        ]
    return images


def patch_dataset(
    cfg: DataConfig,
    scales: Sequence[int],
    *,
    storage: StorageConfig | None = None,
    split: str = "train",
    seed: int | None = None,
    dataset: str = DIV2K,
    num_cpus: float = 1.0,
) -> ray.data.Dataset:
    """A Ray Data dataset of ``cfg.epoch_patches`` random aligned patch pairs per pass, from the manifest at
    ``cfg.root``.

    Columns: ``lr`` uint8 (P, P, 3), ``hr`` uint8 (P*s, P*s, 3), ``scale`` int64, with P = ``cfg.patch_size``; one
    block holds ``cfg.patches_per_image`` patches of one image at one scale (with several scales, blocks of
    different scales have different HR shapes: batch them with :func:`iter_training_batches`, which never mixes
    scales). Images: ``split`` "train" uses ``cfg.train_range``, "valid" ``cfg.val_range`` (DIV2K numbers); other
    datasets are used whole. Augmentation (``cfg.augment``): random hflip, vflip and transpose, the same on LR and HR.

    ``seed=None`` draws every epoch from fresh entropy; an integer makes the sequence of epochs reproducible (e.g.
    ``seed=cfg.seed``). Pass the dataset to ``TorchTrainer(datasets={"train": ...})``: the randomness lives in the
    one execution that Ray Train splits over the ranks, so ranks never see the same crops.
    ``num_cpus`` is reserved per read task (decode + cut).
    """
    import ray.data

    scales = tuple(int(s) for s in scales)
    if not scales:
        raise EdsrRayError("patch_dataset needs at least one scale")
    images = _image_table(cfg, scales, split, dataset, storage)
    source = PatchDatasource(
        images,
        epoch_patches=cfg.epoch_patches,
        patches_per_image=cfg.patches_per_image,
        patch_size=cfg.patch_size,
        augment=cfg.augment,
        seed=seed,
        storage=storage,
    )
    log.info(
        "patch stream from %s: %s, %d patches per epoch in %d blocks",
        cfg.root,
        ", ".join(f"x{s}: {len(v)} images" for s, v in images.items()),
        cfg.epoch_patches,
        source.num_units(),
    )
    blocks = min(source.num_units(), MAX_READ_TASKS)
    return ray.data.read_datasource(source, override_num_blocks=blocks, num_cpus=num_cpus)


# --------------------------------------------------------------------------------------------------------------------
# Feeding a training worker


class TrainingBatch(NamedTuple):
    """One single-scale training batch on the device: float (B, 3, H, W) in [0, 255]."""

    lr: torch.Tensor  # (B, 3, P, P)
    hr: torch.Tensor  # (B, 3, P*s, P*s)
    scale: int


def batches_per_epoch(cfg: DataConfig, batch_size: int, world_size: int, scales: Sequence[int]) -> int:
    """Batches of ``batch_size`` every rank is guaranteed to get from one epoch of :func:`patch_dataset`.

    Ray Train splits an epoch into ``epoch_patches // world_size`` rows per rank (``streaming_split(equal=True)``).
    With one scale that is ``rows // batch_size`` batches. With S scales a rank's rows may split unevenly over the
    scales, and each scale can leave up to ``batch_size - 1`` rows that do not fill a batch, so only
    ``(rows - (S - 1)(batch_size - 1)) // batch_size`` batches are certain; every rank must stop there, or DDP ranks
    would wait for each other forever.
    """
    rows = cfg.epoch_patches // world_size
    spare = (len(scales) - 1) * (batch_size - 1)
    return max(0, (rows - spare) // batch_size)


class _Pool:
    """Patches of one scale waiting to be batched: fixed arrays with swap-remove, so a draw copies only the batch."""

    def __init__(self) -> None:
        self.lr: np.ndarray | None = None
        self.hr: np.ndarray | None = None
        self.size = 0

    def push(self, lr: np.ndarray, hr: np.ndarray) -> None:
        k = len(lr)
        if self.lr is None or self.size + k > len(self.lr):
            capacity = max(2 * (self.size + k), 64)
            new_lr = np.empty((capacity, *lr.shape[1:]), dtype=lr.dtype)
            new_hr = np.empty((capacity, *hr.shape[1:]), dtype=hr.dtype)
            if self.lr is not None:
                new_lr[: self.size] = self.lr[: self.size]
                new_hr[: self.size] = self.hr[: self.size]
            self.lr, self.hr = new_lr, new_hr
        self.lr[self.size : self.size + k] = lr
        self.hr[self.size : self.size + k] = hr
        self.size += k

    def take(self, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        assert self.lr is not None and self.hr is not None and count <= self.size
        picked = rng.choice(self.size, size=count, replace=False)
        lr, hr = self.lr[picked], self.hr[picked]  # fancy indexing copies: (count, ...)
        # Fill the holes below the new size with the surviving rows above it.
        new_size = self.size - count
        holes = np.sort(picked[picked < new_size])
        tail = np.setdiff1d(np.arange(new_size, self.size), picked)
        self.lr[holes] = self.lr[tail]
        self.hr[holes] = self.hr[tail]
        self.size = new_size
        return lr, hr


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class ScaleAgreement:
    """Lets the DDP ranks of a multi-scale (MDSR) run train every update at one common scale, as the paper does.

    Without it each rank would draw its own scale: the shared body would still learn, but each upsampling branch would
    get its gradient averaged with the zeros of the ranks that did not use it. With it, before each batch the ranks
    exchange how many pooled patches of each scale they hold (one small all-reduce on a CPU process group: no GPU
    sync) and all take the same scale, drawn by an RNG seeded alike on every rank among the scales every rank can
    serve, weighted by what the emptiest rank holds. If no scale can be served yet, ranks that still have data read
    more; when none can, the epoch ends for all of them at the same batch.

    ``group``: a gloo process group (``torch.distributed.new_group(backend="gloo")`` when the default group is NCCL),
    or None for the default group when that is already gloo. ``seed`` must be equal on every rank.
    """

    MORE = -1  # decision: read more data, then ask again
    END = 0  # decision: the epoch is over for every rank

    def __init__(self, scales: Sequence[int], seed: int, group: Any = None) -> None:
        self.scales = tuple(int(s) for s in scales)
        self.rng = np.random.default_rng(seed)
        self.group = group

    def decide(self, sizes: Sequence[int], batch_size: int, exhausted: bool) -> int:
        """A scale every rank can batch now, or ``MORE`` / ``END`` (collective: every rank calls it in step)."""
        import torch
        import torch.distributed as dist

        # One MIN all-reduce carries both: the smallest pool of each scale, and -1 if any rank can still read.
        state = torch.tensor([*sizes, 0 if exhausted else -1], dtype=torch.int64)
        dist.all_reduce(state, op=dist.ReduceOp.MIN, group=self.group)
        smallest = state[:-1].numpy().astype(np.float64)
        anyone_reading = int(state[-1]) < 0
        eligible = np.where(smallest >= batch_size, smallest, 0.0)
        if eligible.sum() > 0:
            return self.scales[int(self.rng.choice(len(self.scales), p=eligible / eligible.sum()))]
        return self.MORE if anyone_reading else self.END


def iter_training_batches(
    shard: Any,
    batch_size: int,
    scales: Sequence[int],
    *,
    device: torch.device | str | None = None,
    channels_last: bool = False,
    seed: int | None = None,
    num_batches: int | None = None,
    agreement: ScaleAgreement | None = None,
    shuffle_patches: int = 512,
    prefetch_blocks: int = 4,
) -> Iterator[TrainingBatch]:
    """One epoch of single-scale training batches from a Ray Train dataset shard (or a whole Dataset).

    ``shard`` is what ``ray.train.get_dataset_shard("train")`` returns for a :func:`patch_dataset`. Patches are
    pooled per scale and batches drawn at random from the pool (at least ``shuffle_patches`` patches pooled before a
    draw while the stream lasts), which mixes several images into each batch; a batch's scale is that of a random
    pooled patch, so scales come out as often as the epoch holds them - equally often, as the datasource deals them
    out evenly. Each batch is ``batch_size`` patches of one scale, as float (B, 3, H, W) in [0, 255] on ``device``
    (see :func:`to_model_batch`); ``TrainingBatch`` unpacks as ``lr, hr, scale``.

    ``num_batches``: stop after that many batches and discard the rest of the epoch (it is still read, so that the
    ranks of a streaming split finish the epoch together). ``seed`` seeds the pool's draws (None: fresh entropy).

    With several scales under DDP the ranks must take the same number of steps: pass an ``agreement``
    (:class:`ScaleAgreement`, which also makes every update single-scale across the ranks, and ends the epoch for all
    ranks at once; ``num_batches`` is then a cap) or ``num_batches=batches_per_epoch(cfg.data, batch_size,
    world_size, scales)`` (each rank then draws its own scales and must reach that count).
    """
    scales = tuple(int(s) for s in scales)
    if batch_size < 1:
        raise EdsrRayError(f"batch_size must be >= 1, got {batch_size}")
    if num_batches is None and agreement is None and len(scales) > 1 and _world_size() > 1:
        raise EdsrRayError(
            "with several scales under DDP, ranks may hold different numbers of full single-scale batches; pass "
            "agreement=ScaleAgreement(...) or num_batches=batches_per_epoch(cfg.data, batch_size, world_size, "
            "scales) so every rank takes the same number of steps"
        )
    if agreement is not None and agreement.scales != scales:
        raise EdsrRayError(f"the agreement is for scales {list(agreement.scales)}, the batches for {list(scales)}")
    rng = np.random.default_rng(seed)
    pools = {s: _Pool() for s in scales}
    threshold = max(shuffle_patches, batch_size * len(scales))
    blocks = iter(shard.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=prefetch_blocks))
    exhausted = False

    def pull() -> None:
        """Pool the next block of the stream (or note that the stream has ended)."""
        nonlocal exhausted
        block = next(blocks, None)
        if block is None:
            exhausted = True
            return
        block_scales = np.asarray(block["scale"])
        for scale in np.unique(block_scales).tolist():
            if scale not in pools:
                raise EdsrRayError(f"the stream holds x{scale} patches but training expects scales {list(scales)}")
            rows = block_scales == scale
            lr, hr = block["lr"], block["hr"]
            pools[scale].push(lr if rows.all() else lr[rows], hr if rows.all() else hr[rows])

    def next_scale() -> int | None:
        """This batch's scale, reading from the stream as needed; None when the epoch is over."""
        while True:
            while not exhausted and sum(p.size for p in pools.values()) < threshold:
                pull()
            sizes = [pools[s].size for s in scales]
            if agreement is not None:
                decision = agreement.decide(sizes, batch_size, exhausted)
                if decision == ScaleAgreement.END:
                    return None
                if decision != ScaleAgreement.MORE:
                    return decision
            else:
                eligible = np.array([n if n >= batch_size else 0 for n in sizes], dtype=np.float64)
                if eligible.sum() > 0:
                    return scales[int(rng.choice(len(scales), p=eligible / eligible.sum()))]
                if exhausted:
                    return None
            if not exhausted:
                pull()

    emitted = 0
    while num_batches is None or emitted < num_batches:
        scale = next_scale()
        if scale is None:
            break
        lr, hr = pools[scale].take(batch_size, rng)
        emitted += 1
        lr_t, hr_t = to_model_batch({"lr": lr, "hr": hr}, device=device, channels_last=channels_last)
        yield TrainingBatch(lr_t, hr_t, scale)
    for _ in blocks:
        pass  # drain: finish the epoch, so that the ranks of a streaming split end it together
    if agreement is None and num_batches is not None and emitted < num_batches:
        raise EdsrRayError(
            f"the epoch ended after {emitted} batches, fewer than num_batches={num_batches}; compute it with "
            "batches_per_epoch() from the same epoch_patches, batch size and number of workers"
        )


def to_model_batch(
    batch: dict[str, Any], device: torch.device | str | None = None, channels_last: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NHWC ``batch["lr"]``, ``batch["hr"]`` (numpy or torch) -> float NCHW in [0, 255] on ``device``.

    On an accelerator the uint8 tensors cross first (4x fewer bytes than float), from pinned memory so the copy is
    asynchronous, and are converted there. Permuting an NHWC tensor to NCHW gives exactly the channels_last memory
    layout, so ``channels_last=True`` costs no extra copy; otherwise the result is made contiguous.
    """
    import torch

    device = torch.device(device) if device is not None else torch.device("cpu")
    out = []
    for key in ("lr", "hr"):
        x = batch[key]  # (B, H, W, 3) uint8
        on_cpu = not isinstance(x, torch.Tensor) or x.device.type == "cpu"
        if device.type == "cpu" and on_cpu:
            # Convert in NumPy, in one single-threaded pass: torch would spread these small copies over its intra-op
            # threads, which costs several times the CPU of the copy itself (measured: 2.4 vs 0.3 ms per batch).
            x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
            if channels_last:
                t = torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2)  # (B, 3, H, W), NHWC storage
            else:
                t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32))
        else:
            t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
            if t.device.type == "cpu" and device.type == "cuda":
                t = t.pin_memory()
            t = t.to(device, non_blocking=True).permute(0, 3, 1, 2).float()  # (B, 3, H, W), channels_last strides
            t = t if channels_last else t.contiguous()
        out.append(t)
    return out[0], out[1]


# --------------------------------------------------------------------------------------------------------------------
# Validation images


@dataclass(frozen=True, eq=False)
class ValidationImage:
    """One validation pair: ``hr`` is exactly ``lr`` x ``scale`` (HR cropped to that, as the protocol does)."""

    id: str
    dataset: str
    scale: int
    lr: np.ndarray  # (h, w, 3) uint8
    hr: np.ndarray  # (h*s, w*s, 3) uint8

    @property
    def protocol(self) -> str:
        """The evaluation protocol of :mod:`edsr_ray.metrics`: RGB for DIV2K, Y channel for benchmark sets."""
        return "div2k" if self.dataset == DIV2K else "benchmark"


def _centre_crop(lr: np.ndarray, hr: np.ndarray, scale: int, max_hr_side: int | None) -> tuple[np.ndarray, np.ndarray]:
    lh, lw = lr.shape[:2]
    ch, cw = lh, lw
    if max_hr_side is not None:
        ch, cw = min(lh, max_hr_side // scale), min(lw, max_hr_side // scale)
    y, x = (lh - ch) // 2, (lw - cw) // 2
    lr = lr[y : y + ch, x : x + cw]
    hr = hr[y * scale : (y + ch) * scale, x * scale : (x + cw) * scale]
    return np.ascontiguousarray(lr), np.ascontiguousarray(hr)


def validation_images(
    cfg: DataConfig,
    scales: Sequence[int],
    *,
    storage: StorageConfig | None = None,
    split: str = "valid",
    dataset: str = DIV2K,
    max_workers: int = 8,
) -> list[ValidationImage]:
    """The validation pairs for every scale, loaded here (meant for rank 0; a handful of images).

    ``split`` "valid" takes DIV2K ``cfg.val_range`` (paper: 801-810); other datasets are used whole (e.g.
    ``dataset="Set5"``). With ``cfg.val_max_size`` each pair is a centre crop whose HR side is at most that, aligned
    to the scale; otherwise whole images (HR cropped to LR x scale).
    """
    manifest = read_manifest(cfg.root, storage)
    index_range = _range_for(cfg, split, dataset)
    jobs = []
    for scale in scales:
        rows = select(manifest, dataset, index_range, scale)
        if not len(rows):
            raise EdsrRayError(f"{cfg.root}: no {dataset} validation image in {index_range} at x{scale}")
        jobs += [(row, int(scale)) for row in rows.to_dict("records")]

    def load(job: tuple[dict[str, Any], int]) -> ValidationImage:
        row, scale = job
        hr_uri = storage_lib.join(cfg.root, row["hr_key"])
        lr_uri = storage_lib.join(cfg.root, row[lr_column(scale, "key")])
        hr = decode_rgb8(storage_lib.read_bytes(hr_uri, storage), hr_uri)
        lr = decode_rgb8(storage_lib.read_bytes(lr_uri, storage), lr_uri)
        lr, hr = _centre_crop(lr, hr, scale, cfg.val_max_size)
        if hr.shape[:2] != (lr.shape[0] * scale, lr.shape[1] * scale):
            raise ImageError(f"{hr_uri}: HR is smaller than {lr_uri} x{scale}")
        return ValidationImage(str(row["id"]), dataset, scale, lr, hr)

    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        return list(pool.map(load, jobs))
