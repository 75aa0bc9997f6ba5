"""The dataset manifest: ``manifest.parquet`` at the root of every dataset ``jobs/ingest.py`` writes, one row per HR
image (schema :data:`MANIFEST_SCHEMA`), and the selections made from it. No Ray here: ingest and evaluation read and
write it in plain processes; the patch stream (:mod:`edsr_ray.training.patches`) builds on it.

A dataset root (``s3://bucket/prefix`` or a folder) holds the images in the DIV2K layout and this manifest. DIV2K rows
are indexed by image number, so the paper's ranges select them directly (train 1-800, validation 801-810).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from edsr_ray import storage as storage_lib
from edsr_ray.config import SCALES, DataConfig
from edsr_ray.errors import EdsrRayError
from edsr_ray.storage import StorageConfig

if TYPE_CHECKING:
    import pandas as pd

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


def split_range(cfg: DataConfig, split: str, dataset: str) -> tuple[int, int] | None:
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
        index_range = split_range(cfg, split, dataset)
        for scale in scales:
            rows = select(manifest, dataset, index_range, scale)
            if split == "train":
                rows = rows[fits_patch(rows, scale, cfg.patch_size)]
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


def fits_patch(rows: pd.DataFrame, scale: int, patch_size: int) -> Any:
    """A mask of the rows whose LR image at ``scale`` is at least ``patch_size`` pixels each way."""
    return (rows[lr_column(scale, "width")] >= patch_size) & (rows[lr_column(scale, "height")] >= patch_size)
