"""Upscaling collections of images: which inputs there are, where each output goes, and the three stages every image
passes through (read + decode, upscale, encode + write).

The stages are functions over Arrow tables (:func:`decode_batch`, :class:`UpscaleBatch`, :func:`write_batch`), so that
:mod:`edsr_ray.batch` runs them as a streaming Ray Data pipeline (CPU tasks, a model actor pool, CPU tasks) and a
``--local`` run calls the very same functions in-process: one code path either way. Rows carry their failure reason
(``reason`` non-empty) through the later stages instead of raising, so a bad input never stops a run and ends up in
the manifest with its reason.

Between stages an image travels as raw pixel bytes plus the fields needed to rebuild its
:class:`~edsr_ray.imaging.DecodedImage` exactly (bit depth, grey, alpha, format, mode): 16-bit samples, alpha and
greyness survive the trip, and a grey or 16-bit image is written back as such.

Guarantees: an output keeps its input's relative key under the output location; nothing is written outside it (keys
never contain ``..``; local writes are checked against symbolic links); every write is atomic (temp file + rename, one
S3 PUT, or a completed multipart upload), so no partial output is ever visible.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from edsr_ray import storage
from edsr_ray.config import InferenceConfig, from_dict
from edsr_ray.errors import ConfigError, EdsrRayError, ImageError, LocationError, StorageError
from edsr_ray.imaging import (
    FORMAT_EXTENSIONS,
    IMAGE_SUFFIXES,
    MAX_PIXELS_DEFAULT,
    SNIFF_BYTES,
    DecodedImage,
    check_output_size,
    decode_image,
    encode_image,
    format_from_name,
    sniff,
)
from edsr_ray.storage import StorageConfig

logger = logging.getLogger(__name__)

# A folder or prefix is searched for files with IMAGE_SUFFIXES, and for files without an extension whose first bytes
# say they are an image (SNIFF_THREADS of those read at once); list files may name other files too (each is tried,
# and fails clearly). Whatever else a folder holds is counted as ignored, with a few examples in the summary.
SNIFF_THREADS = 16
IGNORED_EXAMPLES = 5
# An --input ending like this is a list of inputs, not an image: text (one path or URI a line) or Parquet.
LIST_SUFFIXES = (".txt", ".lst", ".list")
PARQUET_SUFFIX = ".parquet"
PARQUET_COLUMNS = ("path", "uri")
# Memory one list-file entry costs beyond its characters (Python strings, list slots): a list file is bounded by what
# its entries take in memory, characters plus this per entry, since a short file can name a great many of them.
LIST_ENTRY_BYTES = 100
# Formats outputs are written in; "same" keeps an input's format when it is one of these (by extension).
OUTPUT_FORMATS = ("same", "png", "jpeg", "webp")
WRITTEN_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
PNG_COMPRESSION = ("fast", "small")
# Pillow's default zlib level: what "small" PNGs are written with.
SMALL_PNG_LEVEL = 6
# The run's reports, written next to the outputs.
MANIFEST_NAME = "_manifest.parquet"
SUMMARY_NAME = "_summary.json"
# Reads / writes of one batch in flight at once: hides object-store latency behind decoding and encoding.
IO_THREADS = 8
# Failures a run records per image instead of stopping: anything the input (or its output location) can cause. The
# model stage adds torch's out-of-memory error; the codec stages never import torch (lighter, faster-starting workers).
ITEM_ERRORS = (EdsrRayError, OSError, MemoryError)

# Columns of the tables between stages. ``width``/``height`` are the input's size; ``pixel_width``/``pixel_height``
# describe the bytes in ``pixels`` (the input's after decoding, the output's after upscaling).
TASK_SCHEMA = pa.schema([("input", pa.string()), ("output", pa.string())])
IMAGE_SCHEMA = pa.schema(
    [
        ("input", pa.string()),
        ("output", pa.string()),
        ("reason", pa.string()),
        ("input_bytes", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("bit_depth", pa.int8()),
        ("grey", pa.bool_()),
        ("has_alpha", pa.bool_()),
        ("format", pa.string()),
        ("mode", pa.string()),
        ("pixel_width", pa.int32()),
        ("pixel_height", pa.int32()),
        # large_binary: an upscaled image can exceed the 2 GiB a plain binary column holds per chunk.
        ("pixels", pa.large_binary()),
        ("seconds", pa.float64()),
    ]
)
# One row per input in ``_manifest.parquet``. ``bytes`` is the output's size; ``seconds`` the time spent on the image
# (read, decode, its share of a model batch, encode, write).
MANIFEST_SCHEMA = pa.schema(
    [
        ("input", pa.string()),
        ("output", pa.string()),
        ("status", pa.string()),  # ok | skipped (the output existed) | failed (see reason)
        ("reason", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("bytes", pa.int64()),
        ("input_bytes", pa.int64()),
        ("seconds", pa.float64()),
    ]
)


@dataclass(frozen=True)
class OutputOptions:
    """How inputs are read and outputs written.

    ``fmt`` "same" keeps each input's format (PNG for formats that are not written, e.g. TIFF). ``png_compression``
    "fast" writes 8-bit RGB/RGBA PNGs with fpng (a 1080p image in 7 ms on one core, 57x faster than Pillow's default;
    files 1.34x the size: benchmarks/RESULTS.md) and other PNGs with zlib level 1; "small" uses zlib level 6
    (Pillow's default) everywhere: the smallest files, ~400 ms per 1080p image, too slow to keep up with a GPU.
    ``max_pixels`` is the decompression-bomb guard for inputs.
    """

    fmt: str = "same"
    quality: int = 95  # JPEG / WebP
    png_compression: str = "fast"
    max_pixels: int = MAX_PIXELS_DEFAULT

    def __post_init__(self) -> None:
        if self.fmt not in OUTPUT_FORMATS:
            raise ConfigError(f"output format must be one of {list(OUTPUT_FORMATS)}, got {self.fmt!r}")
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"quality must be in 1..100, got {self.quality}")
        if self.png_compression not in PNG_COMPRESSION:
            raise ConfigError(f"png_compression must be one of {list(PNG_COMPRESSION)}, got {self.png_compression!r}")
        if self.max_pixels < 1:
            raise ConfigError(f"max_pixels must be >= 1, got {self.max_pixels}")


@dataclass(frozen=True)
class Task:
    """One image to upscale: where it is, its key relative to the input location, and where its output goes."""

    source: str
    key: str
    dest: str


# --------------------------------------------------------------------------------------------------------------------
# Inputs and names


def absolute(uri: str, *, what: str = "") -> str:
    """``uri`` with a local path made absolute (Ray workers run in another working directory); S3 URIs as given.

    Any other scheme (``gs://``, ``S3://``, ``gs:bucket``) is a :class:`~edsr_ray.errors.LocationError` that starts
    with ``what`` (e.g. ``--output``), never a local folder named after it.
    """
    if storage.location_kind(uri, storage.DATA_LOCATIONS, what=what) == storage.S3:
        return uri
    return os.path.abspath(storage.local_path(uri))


def has_extension(key: str) -> bool:
    """Whether a key's file name has an extension (a leading dot, as in ``.profile``, does not make one)."""
    return "." in PurePosixPath(key).name.lstrip(".")


def output_key(key: str, fmt: str, detected: str | None = None) -> str:
    """The output's relative key: the input's, with the extension of ``fmt`` ("same" keeps it, or makes it .png).

    ``detected`` is the format an input without an extension was recognised as ("jpeg"): with "same" its output
    gets that format's extension when it is written, else .png; a name without an extension only gains one.
    """
    path = PurePosixPath(key)
    if fmt == "same":
        if path.suffix.lower() in WRITTEN_SUFFIXES:
            return key
        fmt = detected if detected in FORMAT_EXTENSIONS else "png"
    extension = FORMAT_EXTENSIONS[fmt]
    return f"{key}{extension}" if not has_extension(key) else str(path.with_suffix(extension))


def written_format(dest: str, fmt: str) -> str:
    """The format an output is written in: ``fmt``, or with "same" the one its name says (see :func:`output_key`)."""
    return fmt if fmt != "same" else format_from_name(dest)


def check_upscaled_size(width: int, height: int, scale: int, fmt: str) -> None:
    """Raise :class:`ImageError` when a ``width`` x ``height`` input upscaled by ``scale`` cannot be stored as
    ``fmt`` (known from the input's header, so before any model time is spent on it)."""
    try:
        check_output_size(width * scale, height * scale, fmt)
    except ImageError as exc:
        raise ImageError(f"its x{scale} output cannot be written: {exc}") from None


def is_list_file(uri: str) -> bool:
    """True when ``--input`` names a list of inputs (.txt/.lst/.list or .parquet) rather than an image or folder."""
    return str(uri).lower().endswith((*LIST_SUFFIXES, PARQUET_SUFFIX))


def read_list_file(uri: str, cfg: StorageConfig | None = None) -> list[str]:
    """The inputs a list file names, as absolute paths or URIs, in order, without duplicates.

    Text: one path or URI a line; blank lines and lines starting with ``#`` are ignored. Parquet: the ``path`` or
    ``uri`` column. Relative entries are relative to the list file's folder (or S3 prefix). An entry in a scheme other
    than a local path, ``file://`` or ``s3://`` is a :class:`~edsr_ray.errors.LocationError` naming its line (row).
    The list file is read whole, so its size is bounded like any read (``max_read_bytes``), and so is the memory its
    entries take once decoded (characters plus :data:`LIST_ENTRY_BYTES` each): a few kilobytes of Parquet can repeat
    one long entry a million times.
    """
    data = storage.read_bytes(uri, cfg)
    limit = (cfg or StorageConfig()).max_read_bytes
    if uri.lower().endswith(PARQUET_SUFFIX):
        import pyarrow.parquet as pq

        try:
            names = pq.ParquetFile(io.BytesIO(data)).schema_arrow.names
            column = next((c for c in PARQUET_COLUMNS if c in names), None)
            if column is None:
                raise ConfigError(f"--input {uri}: a Parquet list needs a 'path' or 'uri' column; it has {names}")
            # Dictionary-encoded, the column stays as small as the file while its decoded size is measured.
            parquet = pq.ParquetFile(io.BytesIO(data), read_dictionary=[column])
            values = _parquet_values(parquet, column, limit, uri)
        except (pa.ArrowException, OSError) as exc:
            raise ConfigError(f"--input {uri}: not a readable Parquet file: {exc}") from None
        entries = [(f"row {n}", str(v).strip()) for n, v in enumerate(values, 1) if v is not None and str(v).strip()]
    else:
        if len(data) + LIST_ENTRY_BYTES * (data.count(b"\n") + 1) > limit:
            raise _list_too_large(uri, limit)
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise ConfigError(f"--input {uri}: a list file must be UTF-8 text, one path or URI a line") from None
        entries = [(f"line {n}", line.strip()) for n, line in enumerate(text.splitlines(), 1)]
        entries = [(where, e) for where, e in entries if e and not e.startswith("#")]
    base = uri.rsplit("/", 1)[0] if storage.is_s3(uri) else os.path.dirname(absolute(uri))
    resolved = []
    for where, entry in entries:
        try:
            kind = storage.location_kind(entry, storage.DATA_LOCATIONS)
        except LocationError as exc:
            raise LocationError(f"--input {uri}, {where}: {exc}") from None
        if kind == storage.S3 or os.path.isabs(os.path.expanduser(entry)) or entry.startswith(storage.FILE_PREFIX):
            resolved.append(absolute(entry))
        elif storage.is_s3(base):
            # Relative to the list file's prefix, resolved the way a shell would (``./a.png``, ``a/../b.png``).
            bucket, prefix = storage.split_s3(base)
            key = posixpath.normpath(posixpath.join(prefix, entry))
            if key == ".." or key.startswith("../"):
                raise ConfigError(f"--input {uri}: the entry {entry!r} points above the bucket s3://{bucket}")
            resolved.append(f"{storage.S3_PREFIX}{bucket}/{key}")
        else:
            resolved.append(os.path.normpath(os.path.join(base, entry)))
    return list(dict.fromkeys(resolved))


def _parquet_values(parquet: Any, column: str, limit: int, uri: str) -> list[Any]:
    """A Parquet list's entries, batch by batch, refused once they would decode to more than ``limit`` bytes: a
    repeated value costs one dictionary entry in the file but a string per row in memory (a thousandfold, and more)."""
    import pyarrow.compute as pc

    values: list[Any] = []
    decoded = 0
    for batch in parquet.iter_batches(batch_size=4096, columns=[column]):
        array = batch.column(0)
        if pa.types.is_dictionary(array.type) and pa.types.is_string(array.type.value_type):
            size = pc.sum(pc.take(pc.binary_length(array.dictionary), array.indices)).as_py() or 0
        else:
            size = array.nbytes
        decoded += size + LIST_ENTRY_BYTES * len(array)
        if decoded > limit:
            raise _list_too_large(uri, limit)
        values += array.to_pylist()
    return values


def _list_too_large(uri: str, limit: int) -> ConfigError:
    return ConfigError(
        f"--input {uri}: the list's entries take more than the {limit:,} bytes one read may take (the max_read_bytes "
        f"limit, counting {LIST_ENTRY_BYTES} bytes of memory per entry beyond its characters)"
    )


def _parts(uri: str) -> tuple[str, ...]:
    """Path components with the root first: ``("s3://", bucket, ...)`` or ``("/", ...)``."""
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        return ("s3://", bucket, *[p for p in key.split("/") if p])
    return PurePosixPath(uri).parts


def relative_keys(sources: Sequence[str]) -> list[str]:
    """Keys for listed inputs: each path relative to the deepest folder all of them share.

    ``s3://b/photos/a/1.jpg`` and ``s3://b/photos/c/2.jpg`` give ``a/1.jpg`` and ``c/2.jpg``. Inputs in different
    buckets (or local and S3 together) share no folder: their keys start with the bucket or the path below ``/``.
    """
    if not sources:
        return []
    parts = [_parts(s) for s in sources]
    common = list(parts[0][:-1])
    for p in parts[1:]:
        folder = p[:-1]
        n = 0
        while n < min(len(common), len(folder)) and common[n] == folder[n]:
            n += 1
        del common[n:]
    return ["/".join(x for x in p[len(common) :] if x not in ("s3://", "/")) for p in parts]


class Listing(NamedTuple):
    """What an ``--input`` holds: the inputs, and the files of a folder or prefix left out, with why."""

    inputs: list[tuple[str, str, str | None]]  # (source, key relative to the input, format sniffed from content)
    ignored: list[tuple[str, str]]  # (source, why it is not an input)


def list_inputs(input_uri: str, output_uri: str, cfg: StorageConfig | None = None) -> Listing:
    """Every input: the images below a folder or prefix (recursively), the one file named, or the entries of a list
    file. Files of a folder that lie inside the output location are left out (an output folder inside the input folder
    must not become input); an input folder at or inside the output location is refused, since outputs could then
    overwrite inputs. A list file's entries are all returned (see :func:`plan_tasks`).

    Below a folder or prefix, a file is an input when its extension is an image's (:data:`IMAGE_SUFFIXES`), or when it
    has no extension and its first bytes are an image's (:func:`~edsr_ray.imaging.sniff`; one short ranged read per
    such file, several at once); every other file is listed in ``ignored`` with the reason.
    """
    if is_list_file(input_uri) and storage.exists(input_uri, cfg) and not _is_folder(input_uri, cfg):
        sources = read_list_file(input_uri, cfg)
        return Listing([(s, k, None) for s, k in zip(sources, relative_keys(sources))], [])
    inside_output = _inside_of(output_uri)
    if inside_output(input_uri):
        raise ConfigError(
            f"--input {input_uri} lies inside --output {output_uri}: outputs could overwrite inputs; choose an output "
            "location outside the input"
        )
    files = storage.list_files(input_uri, cfg)
    base = input_uri.rstrip("/")
    if len(files) == 1 and files[0].rstrip("/") == base:
        return Listing([(files[0], PurePosixPath(files[0]).name, None)], [])
    inputs: list[tuple[str, str, str | None]] = []
    ignored: list[tuple[str, str]] = []
    unnamed: list[str] = []
    for source in files:
        if inside_output(source):
            ignored.append((source, f"it lies inside the output location {output_uri}"))
        elif source.lower().endswith(IMAGE_SUFFIXES):
            inputs.append((source, source[len(base) + 1 :], None))
        elif not has_extension(source):
            unnamed.append(source)
        else:
            ignored.append((source, f".{source.rsplit('.', 1)[1]} is not an image extension"))
    for source, found in zip(unnamed, _sniff_files(unnamed, cfg)):
        if isinstance(found, storage.NotRegularFileError):  # a FIFO, a link to a folder, ...: nothing to sniff
            ignored.append((source, f"no extension, and {str(found).removeprefix(source + ': ')}"))
        elif isinstance(found, BaseException) or found.kind == "image":  # unreadable: fails as an input, by name
            detected = None if isinstance(found, BaseException) else found.format
            inputs.append((source, source[len(base) + 1 :], detected))
        else:
            ignored.append((source, f"no extension, and its content is not an image: {found.description}"))
    return Listing(inputs, ignored)


def _sniff_files(uris: Sequence[str], cfg: StorageConfig | None) -> list[Any]:
    """:func:`~edsr_ray.imaging.sniff` of each file's first bytes, read several at once; the error where unreadable."""

    def one(uri: str) -> Any:
        try:
            return sniff(*storage.read_head(uri, SNIFF_BYTES, cfg))
        except ITEM_ERRORS as exc:
            return exc

    if not uris:
        return []
    with ThreadPoolExecutor(max_workers=min(SNIFF_THREADS, len(uris))) as pool:
        return list(pool.map(one, uris))


def _is_folder(uri: str, cfg: StorageConfig | None) -> bool:
    if storage.is_s3(uri):
        return False  # an object and a prefix of the same name: the object (the list file) wins
    return os.path.isdir(uri)


def _inside_of(output_uri: str) -> Callable[[str], bool]:
    """A test of whether a location lies at or below ``output_uri`` (resolved once, not once per input)."""
    if storage.is_s3(output_uri):
        root = output_uri.rstrip("/")
        return lambda source: storage.is_s3(source) and (source.rstrip("/") == root or source.startswith(root + "/"))
    real_root = os.path.realpath(output_uri)
    return lambda source: not storage.is_s3(source) and _is_within(os.path.realpath(source), real_root)


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class Plan(NamedTuple):
    """The work of a run: tasks in sorted order, inputs that cannot be written (with why), files ignored (with why)."""

    tasks: list[Task]
    refused: list[tuple[Task, str]]
    ignored: list[tuple[str, str]]


def plan_tasks(input_uri: str, output_uri: str, fmt: str = "same", cfg: StorageConfig | None = None) -> Plan:
    """Tasks for every input, in sorted order, plus the inputs that cannot be written and the files that are not
    inputs, each with the reason.

    Two inputs that would write the same output (``a.jpg`` and ``a.png`` with ``--format png``) cannot both be
    written: the second is refused. (Outputs are always images, so they never collide with the run's reports.)
    """
    tasks, refused, seen = [], [], {}
    inside_output = _inside_of(output_uri)
    listing = list_inputs(input_uri, output_uri, cfg)
    for source, key, detected in sorted(listing.inputs, key=lambda p: p[1]):
        out_key = output_key(key, fmt, detected)
        try:
            dest = storage.join(output_uri, out_key)
        except StorageError as exc:
            refused.append((Task(source, key, ""), str(exc)))
            continue
        task = Task(source, key, dest)
        if inside_output(source):  # a list file's entry: writing beside it could overwrite another input
            refused.append((task, f"it lies inside the output location {output_uri}"))
        elif dest in seen:
            refused.append((task, f"its output {dest} is also the output of {seen[dest]}"))
        else:
            seen[dest] = source
            tasks.append(task)
    return Plan(tasks, refused, sorted(listing.ignored))


def existing_outputs(output_uri: str, cfg: StorageConfig | None = None) -> set[str]:
    """Every file already under the output location: one listing, instead of one request per image."""
    try:
        return set(storage.list_files(output_uri, cfg))
    except storage.NotFoundError:
        if storage.is_s3(output_uri):
            raise  # a missing bucket: writing would fail for every image
        return set()


def remove_stale_temp_files(output_uri: str) -> int:
    """Delete the temporary files that a killed run left in a local output folder; returns how many.

    Atomic local writes go through ``.<name>.<random>.edsr-tmp`` files that are renamed when complete; a process
    killed in between leaves one behind. They are never outputs (listings skip them), only litter. One run at a time
    per output location is assumed: a concurrent run's in-flight temp file would be removed too (its write then fails
    and is retried by the next run). S3 needs nothing of the kind: a PUT is all or nothing, and an interrupted
    multipart upload never becomes an object (a bucket lifecycle rule can expire its parts).
    """
    if storage.is_s3(output_uri) or not os.path.isdir(output_uri):
        return 0
    removed = 0
    for folder, _dirs, files in os.walk(output_uri):
        for name in files:
            if name.startswith(".") and name.endswith(storage.TMP_SUFFIX):
                try:
                    os.unlink(os.path.join(folder, name))
                    removed += 1
                except OSError as exc:
                    logger.warning("cannot remove the stale temporary file %s: %s", os.path.join(folder, name), exc)
    return removed


def check_destination(dest: str, output_uri: str) -> None:
    """Refuse a local destination that a symbolic link would carry outside the output folder."""
    if storage.is_s3(dest):
        return
    if not _is_within(os.path.realpath(os.path.dirname(dest) or "."), os.path.realpath(output_uri)):
        raise StorageError(f"refusing to write {dest}: it resolves outside the output folder {output_uri}")


def tasks_table(tasks: Iterable[Task]) -> pa.Table:
    """The pipeline's input rows."""
    tasks = list(tasks)
    return pa.table({"input": [t.source for t in tasks], "output": [t.dest for t in tasks]}, schema=TASK_SCHEMA)


def manifest_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Manifest rows (missing fields null) as a table with :data:`MANIFEST_SCHEMA`."""
    columns = {name: [r.get(name) for r in rows] for name in MANIFEST_SCHEMA.names}
    return pa.table(columns, schema=MANIFEST_SCHEMA)


def reason_of(exc: BaseException, source: str) -> str:
    """A failure's text, naming the input: our errors already name it; others get it put in front."""
    text = str(exc) if isinstance(exc, EdsrRayError) else f"{type(exc).__name__}: {exc}"
    return text if source in text else f"{source}: {text}"


# --------------------------------------------------------------------------------------------------------------------
# Images between stages


def pack_image(img: DecodedImage) -> dict[str, Any]:
    """The row fields that carry ``img``: metadata plus raw pixels (RGB, then alpha; 16-bit little-endian)."""
    dtype = "<u2" if img.bit_depth == 16 else np.uint8
    pixels = np.ascontiguousarray(img.rgb, dtype=dtype).tobytes()
    if img.alpha is not None:
        pixels += np.ascontiguousarray(img.alpha, dtype=dtype).tobytes()
    return {
        "bit_depth": img.bit_depth,
        "grey": img.grey,
        "has_alpha": img.alpha is not None,
        "format": img.format,
        "mode": img.mode,
        "pixel_width": img.width,
        "pixel_height": img.height,
        "pixels": pixels,
    }


def unpack_image(row: Mapping[str, Any], pixels: Any) -> DecodedImage:
    """Rebuild the :class:`DecodedImage` of a row; ``pixels`` is its ``pixels`` value (bytes or an Arrow buffer, read
    without a copy: the arrays are read-only views)."""
    h, w, depth = int(row["pixel_height"]), int(row["pixel_width"]), int(row["bit_depth"])
    dtype = np.dtype("<u2") if depth == 16 else np.dtype(np.uint8)
    flat = np.frombuffer(pixels, dtype=dtype)
    n = h * w * 3
    expected = n + (h * w if row["has_alpha"] else 0)
    if flat.size != expected:
        raise EdsrRayError(f"{row['input']}: {flat.size} pixel samples in the pipeline row, expected {expected}")
    native = np.uint16 if depth == 16 else np.uint8
    rgb = flat[:n].reshape(h, w, 3).astype(native, copy=False)
    alpha = flat[n:].reshape(h, w).astype(native, copy=False) if row["has_alpha"] else None
    return DecodedImage(rgb, alpha, depth, bool(row["grey"]), row["format"], str(row["mode"]))


def _rows(table: pa.Table) -> tuple[list[dict[str, Any]], list[Any]]:
    """(fields of every row without the pixels, the pixel buffers as zero-copy Arrow buffers or None)."""
    if "pixels" not in table.column_names:
        return table.to_pylist(), [None] * table.num_rows
    records = table.drop_columns(["pixels"]).to_pylist()
    column = table.column("pixels")
    buffers = [None if v is None else v.as_buffer() for chunk in column.chunks for v in chunk]
    return records, buffers


def _image_table(records: Sequence[Mapping[str, Any]]) -> pa.Table:
    columns = {name: [r.get(name) for r in records] for name in IMAGE_SCHEMA.names}
    columns["pixels"] = [r.get("pixels") or b"" for r in records]
    columns["reason"] = [r.get("reason") or "" for r in records]
    columns["seconds"] = [float(r.get("seconds") or 0.0) for r in records]
    return pa.table(columns, schema=IMAGE_SCHEMA)


def _storage_cfg(storage_config: Mapping[str, Any] | StorageConfig | None) -> StorageConfig | None:
    if storage_config is None or isinstance(storage_config, StorageConfig):
        return storage_config
    return from_dict(StorageConfig, storage_config, source="storage settings")


def _output_options(options: Mapping[str, Any] | OutputOptions) -> OutputOptions:
    return options if isinstance(options, OutputOptions) else from_dict(OutputOptions, options, source="options")


# --------------------------------------------------------------------------------------------------------------------
# Stage 1: read + decode (CPU tasks)


def _timed_read(source: str, cfg: StorageConfig | None) -> tuple[bytes | BaseException, float]:
    start = time.perf_counter()
    try:
        return storage.read_bytes(source, cfg), time.perf_counter() - start
    except ITEM_ERRORS as exc:
        return exc, time.perf_counter() - start


def decode_batch(
    tasks: pa.Table,
    *,
    max_pixels: int = MAX_PIXELS_DEFAULT,
    storage_config: Mapping[str, Any] | None = None,
    scale: int | None = None,
    fmt: str = "same",
) -> pa.Table:
    """Task rows → image rows: every input read (several at once) and decoded; failures keep their reason.

    With ``scale``, an input whose upscaled size its output format (``fmt``, an :data:`OUTPUT_FORMATS` value) cannot
    store fails here, before the model stage spends any time on it.
    """
    cfg = _storage_cfg(storage_config)
    sources, dests = tasks.column("input").to_pylist(), tasks.column("output").to_pylist()
    with ThreadPoolExecutor(max_workers=max(1, min(IO_THREADS, len(sources)))) as pool:
        reads = list(pool.map(lambda s: _timed_read(s, cfg), sources))
    records = []
    for source, dest, (data, seconds) in zip(sources, dests, reads):
        row: dict[str, Any] = {"input": source, "output": dest}
        start = time.perf_counter()
        try:
            if isinstance(data, BaseException):
                raise data
            row["input_bytes"] = len(data)
            img = decode_image(data, name=source, max_pixels=max_pixels)
            row.update(width=img.width, height=img.height)
            if scale is not None:
                check_upscaled_size(img.width, img.height, scale, written_format(dest, fmt))
            row.update(pack_image(img))
        except ITEM_ERRORS as exc:
            row["reason"] = reason_of(exc, source)
        row["seconds"] = seconds + time.perf_counter() - start
        records.append(row)
    return _image_table(records)


# --------------------------------------------------------------------------------------------------------------------
# Stage 2: upscale (actors holding the model)


class UpscaleBatch:
    """Ray Data callable class: image rows in, upscaled image rows out; the model is loaded once, in ``__init__``.

    8-bit colour images without alpha are grouped by size and each group runs as one batch (the bulk of most
    collections); grey, 16-bit and alpha images go one at a time through :meth:`Upscaler.upscale_decoded`, which keeps
    what they are. A group that fails (e.g. out of GPU memory) is retried image by image, so one image's problem
    stays that image's failure.

    Args:
        model: a model, a checkpoint dict (:func:`~edsr_ray.weights.model_checkpoint`), or a one-element list holding a
            Ray object reference to one (the driver puts the weights in the object store once).
        scale: the scale to upscale by (already checked against the model).
        inference: :class:`~edsr_ray.config.InferenceConfig` fields (tile, self_ensemble, precision, max_pixels).
        device: ``"cpu"``, ``"cuda"``, or None (CUDA when available).
        threads: torch threads for CPU inference (None leaves torch's default).
    """

    def __init__(
        self,
        model: Any,
        scale: int,
        inference: Mapping[str, Any] | InferenceConfig | None = None,
        *,
        device: str | None = None,
        threads: int | None = None,
    ):
        import torch

        from edsr_ray.inference import OUT_OF_MEMORY_ERRORS, Upscaler
        from edsr_ray.weights import load_model

        if isinstance(model, list):  # [ObjectRef]: a list, so that Ray hands it over unresolved
            import ray

            model = ray.get(model[0])
        if not isinstance(model, torch.nn.Module):
            model = load_model(model)
        if threads is not None:
            torch.set_num_threads(max(1, int(threads)))
        if not isinstance(inference, InferenceConfig):
            inference = from_dict(InferenceConfig, inference, source="inference settings")
        self.scale = int(scale)
        self.upscaler = Upscaler.from_config(model, inference, device=device)
        self.errors = (*ITEM_ERRORS, *OUT_OF_MEMORY_ERRORS)
        logger.info("upscaling with %r", self.upscaler)

    def __call__(self, table: pa.Table) -> pa.Table:
        records, buffers = _rows(table)
        groups: dict[tuple[int, int], list[int]] = {}
        singles: list[int] = []
        for i, row in enumerate(records):
            if row["reason"]:
                continue
            if row["bit_depth"] == 8 and not row["grey"] and not row["has_alpha"]:
                groups.setdefault((row["pixel_height"], row["pixel_width"]), []).append(i)
            else:
                singles.append(i)
        outputs: dict[int, DecodedImage] = {}
        for members in groups.values():
            if not self._group(members, records, buffers, outputs):
                singles.extend(members)  # retried one by one below
        for i in sorted(singles):
            self._one(i, records, buffers, outputs)
        for i, row in enumerate(records):
            row["pixels"] = None
            if i in outputs:
                row.update(pack_image(outputs[i]))
        return _image_table(records)

    def _group(self, members: list[int], records: list[dict], buffers: list, outputs: dict) -> bool:
        start = time.perf_counter()
        try:
            images = np.stack([unpack_image(records[i], buffers[i]).rgb for i in members])  # (B, H, W, 3) uint8
            upscaled = self.upscaler.upscale_batch(images, self.scale)  # (B, H*s, W*s, 3)
        except self.errors as exc:
            if len(members) == 1:
                records[members[0]]["reason"] = reason_of(exc, records[members[0]]["input"])
                return True
            logger.warning("a batch of %d images failed (%s); retrying them one by one", len(members), exc)
            _free_cuda_cache()
            return False
        share = (time.perf_counter() - start) / len(members)
        for i, rgb in zip(members, upscaled):
            outputs[i] = DecodedImage(rgb, None, 8, False, records[i]["format"], str(records[i]["mode"]))
            records[i]["seconds"] += share
        return True

    def _one(self, i: int, records: list[dict], buffers: list, outputs: dict) -> None:
        start = time.perf_counter()
        try:
            outputs[i] = self.upscaler.upscale_decoded(unpack_image(records[i], buffers[i]), self.scale)
        except self.errors as exc:
            records[i]["reason"] = reason_of(exc, records[i]["input"])
            _free_cuda_cache()
        records[i]["seconds"] += time.perf_counter() - start


def _free_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------------------
# Stage 3: encode + write (CPU tasks)


def encode_output(image: DecodedImage, fmt: str, options: OutputOptions) -> bytes:
    """Encode an upscaled image as ``fmt`` (png, jpeg or webp) with the options' quality and PNG compression."""
    level = SMALL_PNG_LEVEL if options.png_compression == "small" else 1  # 1: fpng where it can
    return encode_image(image, fmt, quality=options.quality, png_compress_level=level)


def encode_and_write(
    dest: str, image: DecodedImage, options: OutputOptions, output_uri: str, cfg: StorageConfig | None = None
) -> int:
    """Encode the upscaled image in its output's format and write it atomically; returns the bytes written."""
    data = encode_output(image, written_format(dest, options.fmt), options)
    check_destination(dest, output_uri)
    storage.write_bytes(dest, data, cfg)
    return len(data)


def write_batch(
    images: pa.Table,
    *,
    output_uri: str,
    options: Mapping[str, Any] | OutputOptions,
    storage_config: Mapping[str, Any] | None = None,
) -> pa.Table:
    """Image rows → manifest rows: each upscaled image encoded here and written by a few threads (so uploads overlap
    the next encode); rows that failed earlier, or fail now, become ``failed`` rows with their reason."""
    opts = _output_options(options)
    cfg = _storage_cfg(storage_config)
    records, buffers = _rows(images)
    rows: list[dict[str, Any]] = []
    pending: list[tuple[dict[str, Any], Any, float]] = []
    with ThreadPoolExecutor(max_workers=max(1, min(IO_THREADS, len(records)))) as pool:
        for rec, pixels in zip(records, buffers):
            row = {k: rec.get(k) for k in ("input", "output", "reason", "width", "height", "input_bytes", "seconds")}
            rows.append(row)
            if row["reason"]:
                continue
            start = time.perf_counter()
            try:
                data = encode_output(unpack_image(rec, pixels), written_format(row["output"], opts.fmt), opts)
                check_destination(row["output"], output_uri)
            except ITEM_ERRORS as exc:
                row["reason"] = reason_of(exc, row["input"])
                continue
            row["bytes"] = len(data)
            pending.append((row, pool.submit(_timed_write, row["output"], data, cfg), time.perf_counter() - start))
        for row, future, encode_s in pending:
            error, write_s = future.result()
            row["seconds"] = float(row["seconds"] or 0.0) + encode_s + write_s
            if error is not None:
                row["reason"], row["bytes"] = reason_of(error, row["input"]), None
    for row in rows:
        row["status"] = "failed" if row["reason"] else "ok"
    return manifest_table(rows)


def _timed_write(dest: str, data: bytes, cfg: StorageConfig | None) -> tuple[BaseException | None, float]:
    start = time.perf_counter()
    try:
        storage.write_bytes(dest, data, cfg)
        return None, time.perf_counter() - start
    except ITEM_ERRORS as exc:
        return exc, time.perf_counter() - start
