"""The inputs of a batch upscaling run and where each output goes.

An ``--input`` is a folder or prefix (searched recursively: image and video extensions, and files without an extension
whose content is an image or a video), one file, or a list file (text or Parquet). :func:`plan_tasks` turns it into
:class:`Task` rows (source, key relative to the input, destination under the output location), the inputs that cannot
be written (with why) and the files that are not inputs (with why); :func:`existing_outputs` lists what a previous run
wrote, so a re-run does only what is missing.

Guarantees: an output keeps its input's relative key under the output location; keys never contain ``..``; an input
location at or inside the output location is refused, and outputs inside the input location are never taken for
inputs.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, NamedTuple

import pyarrow as pa

from edsr_ray import storage
from edsr_ray.codecs import (
    FORMAT_EXTENSIONS,
    IMAGE_SUFFIXES,
    OUTPUT_SUFFIXES,
    SAME_FORMAT,
    SNIFF_BYTES,
    format_from_name,
    output_format,
    sniff,
)
from edsr_ray.config import from_dict
from edsr_ray.errors import ConfigError, EdsrRayError, LocationError, StorageError
from edsr_ray.storage import StorageConfig
from edsr_ray.video.containers import CONTAINERS, VIDEO_SUFFIXES, choose_output
from edsr_ray.video.options import VideoOptions

logger = logging.getLogger(__name__)

# A folder or prefix is searched for files with IMAGE_SUFFIXES, and for files without an extension whose first bytes
# say they are an image (SNIFF_THREADS of those read at once); list files may name other files too (each is tried,
# and fails clearly). Whatever else a folder holds is counted as ignored, with a few examples in the summary.
SNIFF_THREADS = 16
# An --input ending like this is a list of inputs, not an image: text (one path or URI a line) or Parquet.
LIST_SUFFIXES = (".txt", ".lst", ".list")
PARQUET_SUFFIX = ".parquet"
PARQUET_COLUMNS = ("path", "uri")
# Memory one list-file entry costs beyond its characters (Python strings, list slots): a list file is bounded by what
# its entries take in memory, characters plus this per entry, since a short file can name a great many of them.
LIST_ENTRY_BYTES = 100
# Failures a run records per image instead of stopping: anything the input (or its output location) can cause. The
# model stage adds torch's out-of-memory error; the codec stages never import torch (lighter, faster-starting workers).
ITEM_ERRORS = (EdsrRayError, OSError, MemoryError)


@dataclass(frozen=True)
class Task:
    """One image to upscale: where it is, its key relative to the input location, and where its output goes."""

    source: str
    key: str
    dest: str


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
    if fmt == SAME_FORMAT:
        if path.suffix.lower() in OUTPUT_SUFFIXES:
            return key
        fmt = output_format(SAME_FORMAT, detected)
    extension = FORMAT_EXTENSIONS[fmt]
    return f"{key}{extension}" if not has_extension(key) else str(path.with_suffix(extension))


def video_container(key: str, detected: str | None = None) -> str | None:
    """The container a video input's name (or its sniffed ``detected`` format) suggests; None when neither does."""
    if detected in CONTAINERS:
        return detected
    return VIDEO_SUFFIXES.get(PurePosixPath(key).suffix.lower())


def video_output_key(key: str, container: str, options: VideoOptions) -> str:
    """A video's output key: the input's when its output keeps the input's container family (an .m4v stays .m4v),
    else the input's with the extension of the container written (an .avi becomes .mkv; see
    :func:`~edsr_ray.video.containers.choose_output`)."""
    choice = choose_output(container, options.codec, options.container)
    if choice.same_family and has_extension(key):
        return key
    extension = choice.format.extension
    return f"{key}{extension}" if not has_extension(key) else str(PurePosixPath(key).with_suffix(extension))


def written_format(dest: str, fmt: str) -> str:
    """The format an output is written in: ``fmt``, or with "same" the one its name says (see :func:`output_key`)."""
    return fmt if fmt != SAME_FORMAT else format_from_name(dest)


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

    Below a folder or prefix, a file is an input when its extension is an image's (:data:`IMAGE_SUFFIXES`) or a
    video's (:data:`~edsr_ray.video.containers.VIDEO_SUFFIXES`), or when it has no extension and its first bytes are an
    image's or a video's (:func:`~edsr_ray.codecs.sniff`; one short ranged read per
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
        elif source.lower().endswith((*IMAGE_SUFFIXES, *VIDEO_SUFFIXES)):
            inputs.append((source, source[len(base) + 1 :], None))
        elif not has_extension(source):
            unnamed.append(source)
        else:
            ignored.append((source, f".{source.rsplit('.', 1)[1]} is not an image or video extension"))
    for source, found in zip(unnamed, _sniff_files(unnamed, cfg)):
        if isinstance(found, storage.NotRegularFileError):  # a FIFO, a link to a folder, ...: nothing to sniff
            ignored.append((source, f"no extension, and {str(found).removeprefix(source + ': ')}"))
        elif isinstance(found, BaseException) or found.kind in ("image", "video"):  # unreadable: fails by name
            detected = None if isinstance(found, BaseException) else found.format
            inputs.append((source, source[len(base) + 1 :], detected))
        else:
            why = f"no extension, and its content is neither an image nor a video: {found.description}"
            ignored.append((source, why))
    return Listing(inputs, ignored)


def _sniff_files(uris: Sequence[str], cfg: StorageConfig | None) -> list[Any]:
    """:func:`~edsr_ray.codecs.sniff` of each file's first bytes, read several at once; the error where unreadable."""

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
    return lambda source: not storage.is_s3(source) and is_within(os.path.realpath(source), real_root)


def is_within(path: str, root: str) -> bool:
    """Whether the (resolved) local ``path`` is ``root`` or lies below it."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class Plan(NamedTuple):
    """The work of a run: tasks in sorted order, inputs that cannot be written (with why), files ignored (with why)."""

    tasks: list[Task]
    refused: list[tuple[Task, str]]
    ignored: list[tuple[str, str]]


def plan_tasks(
    input_uri: str,
    output_uri: str,
    fmt: str = SAME_FORMAT,
    cfg: StorageConfig | None = None,
    video: VideoOptions | None = None,
) -> Plan:
    """Tasks for every input, in sorted order, plus the inputs that cannot be written and the files that are not
    inputs, each with the reason. Images get their output key from ``fmt``, videos (by extension, or by content for
    names without one) from ``video`` (:func:`video_output_key`).

    Two inputs that would write the same output (``a.jpg`` and ``a.png`` with ``--format png``) cannot both be
    written: the second is refused. (Outputs are images and videos, so they never collide with the run's reports.)
    """
    tasks, refused, seen = [], [], {}
    inside_output = _inside_of(output_uri)
    listing = list_inputs(input_uri, output_uri, cfg)
    video = video or VideoOptions()
    for source, key, detected in sorted(listing.inputs, key=lambda p: p[1]):
        container = video_container(key, detected)
        out_key = output_key(key, fmt, detected) if container is None else video_output_key(key, container, video)
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
    if not is_within(os.path.realpath(os.path.dirname(dest) or "."), os.path.realpath(output_uri)):
        raise StorageError(f"refusing to write {dest}: it resolves outside the output folder {output_uri}")


def reason_of(exc: BaseException, source: str) -> str:
    """A failure's text, naming the input: our errors already name it; others get it put in front."""
    text = str(exc) if isinstance(exc, EdsrRayError) else f"{type(exc).__name__}: {exc}"
    return text if source in text else f"{source}: {text}"


def storage_cfg(storage_config: Mapping[str, Any] | StorageConfig | None) -> StorageConfig | None:
    """Storage settings as they cross the Ray boundary (plain data) rebuilt; None stays None."""
    if storage_config is None or isinstance(storage_config, StorageConfig):
        return storage_config
    return from_dict(StorageConfig, storage_config, source="storage settings")
