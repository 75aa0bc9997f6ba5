"""The three stages every image of a batch upscaling run passes through, and the rows that carry it between them.

1. :func:`decode_batch` (CPU tasks): task rows (:data:`TASK_SCHEMA`) in, image rows (:data:`IMAGE_SCHEMA`) out: each
   input read (several at once) and decoded behind the pixel limit.
2. :class:`UpscaleBatch` (an actor pool holding the model): image rows in, upscaled image rows out.
3. :func:`write_batch` (CPU tasks): image rows in, result rows (:data:`MANIFEST_SCHEMA`, one per input, the rows of
   ``_manifest.parquet``) out: each image resized to the size asked for (``--outscale``/``--width``/``--height``,
   :mod:`edsr_ray.outsize`), encoded in its output's format and written atomically.

Videos take the same stages as rows of other kinds (``kind`` says which; :mod:`edsr_ray.batch.video`): the first
stage turns a video into a ``video`` row and ``segment`` rows, :func:`decode_segments` (a stage of its own, only in
runs with videos) turns segments into ``part`` rows of a few frames each, the model stage upscales a part's frames
like images, and the write stage encodes each part; the driver joins a video's parts once all are written.

The stages are functions over Arrow tables, so :mod:`edsr_ray.batch.job` runs them as one streaming Ray Data pipeline
and a ``--local`` run calls the very same functions in-process: one code path either way. A new kind of input (say,
video frames) is a new first stage producing the same image rows. Rows carry their failure reason (``reason``
non-empty) through the later stages instead of raising, so a bad input never stops a run and ends up in the manifest
with its reason.

Between stages an image travels as raw pixel bytes plus the fields needed to rebuild its
:class:`~edsr_ray.codecs.DecodedImage` exactly (bit depth, grey, alpha, format, mode): 16-bit samples, alpha and
greyness survive the trip, and a grey or 16-bit image is written back as such. Nothing is written outside the output
location (local writes are checked against symbolic links), and every write is atomic (temp file + rename, one S3
PUT, or a completed multipart upload), so no partial output is ever visible.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from edsr_ray import storage
from edsr_ray.batch import video as videos
from edsr_ray.batch.inputs import (
    ITEM_ERRORS,
    Task,
    check_destination,
    reason_of,
    storage_cfg,
    video_container,
    written_format,
)
from edsr_ray.codecs import (
    FORMAT_EXTENSIONS,
    MAX_PIXELS_DEFAULT,
    OUTPUT_FORMATS,
    SAME_FORMAT,
    SNIFF_BYTES,
    DecodedImage,
    decode_image,
    encode_image,
    output_format,
    sniff,
)
from edsr_ray.config import InferenceConfig, from_dict
from edsr_ray.errors import ConfigError, EdsrRayError, ImageError
from edsr_ray.outsize import OutputSize, plan_output, resize_decoded
from edsr_ray.storage import StorageConfig
from edsr_ray.video import HEAD_BYTES, VideoOptions, sniff_container
from edsr_ray.video import from_dict as video_from_dict

logger = logging.getLogger(__name__)

# What --format takes: an output format of edsr_ray.codecs, or "same" (an input's format when it is an output format,
# told by its extension).
FORMAT_CHOICES = (SAME_FORMAT, *OUTPUT_FORMATS)
PNG_COMPRESSION = ("fast", "small")
# Pillow's default zlib level: what "small" PNGs are written with.
SMALL_PNG_LEVEL = 6
# Reads / writes of one batch in flight at once: hides object-store latency behind decoding and encoding.
IO_THREADS = 8

# Columns of the tables between stages. ``width``/``height`` are the input's size; ``pixel_width``/``pixel_height``
# describe the bytes in ``pixels`` (the input's after decoding, the output's after upscaling); ``scale`` is the model
# scale the image is upscaled by and ``final_width``/``final_height`` the size it is written at (both set by the
# decode stage: :func:`edsr_ray.outsize.plan_output`).
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
        ("scale", pa.int8()),
        ("final_width", pa.int32()),
        ("final_height", pa.int32()),
        # Video rows: frames (a part's frames are stacked in ``pixels``), their pts, concealed frames, and the
        # video's work (JSON: what it is, how it is encoded, where its parts go).
        ("frames", pa.int32()),
        ("pts", pa.list_(pa.int64())),
        ("concealed", pa.int32()),
        ("job", pa.string()),
        ("kind", pa.string()),  # image | video | segment | part (edsr_ray.batch.video)
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
        ("kind", pa.string()),  # image | video; the columns below are the videos' (null for images)
        ("frames", pa.int32()),
        ("duration_s", pa.float64()),
        ("fps", pa.float64()),
        ("codec_in", pa.string()),
        ("codec_out", pa.string()),
        ("container_out", pa.string()),
        ("pix_fmt_out", pa.string()),
        ("segments", pa.int32()),
        ("parts", pa.int32()),
        ("parts_reused", pa.int32()),  # encoded by an earlier, interrupted run
        ("concealed_frames", pa.int32()),
        ("notes", pa.list_(pa.string())),  # what of the input the output does not keep as it was, and why
    ]
)
# What the write stage hands the driver: manifest rows, plus what it needs of video and part rows to join videos.
RESULT_SCHEMA = pa.schema(
    [*MANIFEST_SCHEMA, ("pts", pa.list_(pa.int64())), ("concealed", pa.int32()), ("job", pa.string())]
)


@dataclass(frozen=True)
class CodecOptions:
    """How the codec stages decode inputs and encode outputs.

    ``max_pixels`` is the batch job's pixel limit: inputs with more pixels fail, from their header, before decoding
    (:func:`edsr_ray.codecs.check_pixels`). ``fmt`` "same" keeps each input's format (PNG for formats that are not
    written, e.g. TIFF). ``png_compression`` "fast" writes 8-bit RGB/RGBA PNGs with fpng, many times faster than
    Pillow's default encoder for somewhat larger files, and other PNGs with zlib level 1; "small" uses zlib level 6
    (Pillow's default) everywhere: the smallest files, far too slow to keep up with a GPU (the figures:
    ``benchmarks/RESULTS.md``).
    """

    fmt: str = SAME_FORMAT
    quality: int = 95  # JPEG / WebP
    png_compression: str = "fast"
    max_pixels: int = MAX_PIXELS_DEFAULT

    def __post_init__(self) -> None:
        if self.fmt not in FORMAT_CHOICES:
            raise ConfigError(f"output format must be one of {list(FORMAT_CHOICES)}, got {self.fmt!r}")
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"quality must be in 1..100, got {self.quality}")
        if self.png_compression not in PNG_COMPRESSION:
            raise ConfigError(f"png_compression must be one of {list(PNG_COMPRESSION)}, got {self.png_compression!r}")
        if self.max_pixels < 1:
            raise ConfigError(f"max_pixels must be >= 1, got {self.max_pixels}")


# --------------------------------------------------------------------------------------------------------------------
# Inputs and names


def tasks_table(tasks: Iterable[Task]) -> pa.Table:
    """The pipeline's input rows."""
    tasks = list(tasks)
    return pa.table({"input": [t.source for t in tasks], "output": [t.dest for t in tasks]}, schema=TASK_SCHEMA)


def manifest_table(rows: Sequence[Mapping[str, Any]], schema: pa.Schema = MANIFEST_SCHEMA) -> pa.Table:
    """Manifest rows (missing fields null; ``kind`` from the input's name when missing) as a table with ``schema``."""
    columns = {name: [r.get(name) for r in rows] for name in schema.names}
    columns["kind"] = [r.get("kind") or _kind_of_name(str(r.get("input") or "")) for r in rows]
    return pa.table(columns, schema=schema)


def _kind_of_name(source: str) -> str:
    return "video" if video_container(source) else "image"


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
    columns["kind"] = [r.get("kind") or "image" for r in records]
    columns["pixels"] = [r.get("pixels") or b"" for r in records]
    columns["reason"] = [r.get("reason") or "" for r in records]
    columns["seconds"] = [float(r.get("seconds") or 0.0) for r in records]
    return pa.table(columns, schema=IMAGE_SCHEMA)


def _codec_options(options: Mapping[str, Any] | CodecOptions) -> CodecOptions:
    return options if isinstance(options, CodecOptions) else from_dict(CodecOptions, options, source="options")


# --------------------------------------------------------------------------------------------------------------------
# Stage 1: read + decode (CPU tasks)


def _timed_read(source: str, cfg: StorageConfig | None) -> tuple[bytes | BaseException | None, float]:
    """(The input's bytes, or its error, or None for a video, which is not read whole; seconds taken)."""
    start = time.perf_counter()
    try:
        if video_container(source):
            # A video is read in pieces where it is needed; its first bytes say whether it is one.
            head = storage.read_head(source, SNIFF_BYTES, cfg)[0]
            if sniff(head).kind != "image":
                return None, time.perf_counter() - start
        return storage.read_bytes(source, cfg), time.perf_counter() - start
    except ITEM_ERRORS as exc:
        return exc, time.perf_counter() - start


def _video_options(video: Mapping[str, Any] | VideoOptions | None) -> VideoOptions | None:
    if video is None or isinstance(video, VideoOptions):
        return video
    return video_from_dict(VideoOptions, dict(video))


def decode_batch(
    tasks: pa.Table,
    *,
    max_pixels: int = MAX_PIXELS_DEFAULT,
    storage_config: Mapping[str, Any] | None = None,
    scale: int | None = None,
    fmt: str = SAME_FORMAT,
    size: Mapping[str, Any] | None = None,
    scales: Sequence[int] | None = None,
    video: Mapping[str, Any] | VideoOptions | None = None,
    model_identity: str = "",
) -> pa.Table:
    """Task rows → image rows: every input read (several at once) and decoded; failures keep their reason.

    With ``scale`` (the model's, or ``scales``: those to choose from when a ``size`` is asked for, the fields of an
    :class:`~edsr_ray.outsize.OutputSize`), each row gets its model scale and final size, and an input whose output
    is past the output pixel limit or more than its output format (``fmt``, one of :data:`FORMAT_CHOICES`) can store
    fails here, before the model stage spends any time on it. What an input is comes from its content: with
    ``video`` (:class:`~edsr_ray.video.VideoOptions`, in a run with videos) a video becomes a ``video`` row and its
    ``segment`` rows (:func:`edsr_ray.batch.video.inspect_video`; ``model_identity`` is part of its parts'
    fingerprint); without, it fails with the reason; an image named like a video is upscaled as an image. Output
    sizes are for images: a video in a run that asks for one fails with the reason.
    """
    cfg = storage_cfg(storage_config)
    video_options = _video_options(video)
    sizing = from_dict(OutputSize, size, source="output size")
    available = tuple(scales or ()) or ((scale,) if scale is not None else ())
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
            container = None if data is None else sniff_container(data[:HEAD_BYTES])
            if data is None or container is not None:
                if video_options is None or scale is None:
                    what = container.description if container is not None else "a video"
                    raise ImageError(
                        f"{source}: it is {what} named like an image, in a run planned for images only; give it a "
                        "video extension (.mp4, .mkv, ...) to upscale it as a video"
                    )
                if sizing.asked:
                    raise ImageError(
                        f"{source}: it is a video; output sizes (--outscale, --width, --height) apply to images only: "
                        "upscale videos in a run without them (they are written at the model's factor)"
                    )
                records += videos.inspect_video(
                    source, dest, scale=scale, options=video_options, model_identity=model_identity, cfg=cfg
                )
                continue
            if video_container(dest):  # an image named like a video: written as an image
                extension = FORMAT_EXTENSIONS[output_format(fmt, sniff(data).format)]
                dest = row["output"] = dest.rsplit(".", 1)[0] + extension
            row["input_bytes"] = len(data)
            img = decode_image(data, name=source, max_pixels=max_pixels)
            row.update(width=img.width, height=img.height)
            if available:
                fmt_out = written_format(dest, fmt)
                chosen, final = plan_output(
                    sizing, available, img.height, img.width, max_pixels=max_pixels, fmt=fmt_out
                )
                row.update(scale=chosen, final_height=final[0], final_width=final[1])
            row.update(pack_image(img))
        except ITEM_ERRORS as exc:
            row["reason"] = reason_of(exc, source)
        row["seconds"] = seconds + time.perf_counter() - start
        records.append(row)
    return _image_table(records)


def decode_segments(
    rows: pa.Table,
    *,
    video: Mapping[str, Any] | VideoOptions,
    storage_config: Mapping[str, Any] | None = None,
) -> Iterator[pa.Table]:
    """Segment rows → part rows, one table per part as it is decoded (a generator: memory holds one part of a
    segment at a time); rows of other kinds pass through unchanged, first."""
    cfg = storage_cfg(storage_config)
    options = _video_options(video)
    kinds = rows.column("kind").to_pylist()
    others = [i for i, kind in enumerate(kinds) if kind != "segment"]
    if others:
        yield rows.take(others)
    for i, kind in enumerate(kinds):
        if kind == "segment":
            record = rows.slice(i, 1).drop_columns(["pixels"]).to_pylist()[0]
            for part in videos.decode_segment_rows(record, options, cfg):
                yield _image_table([part])


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
        inference: :class:`~edsr_ray.config.InferenceConfig` fields (tile, self_ensemble, precision).
        device: ``"cpu"``, ``"cuda"``, or None (CUDA when available).
        threads: torch threads for CPU inference (None leaves torch's default).
        frame_batch: frames of a video part per model call (the images' batch size of the run).
    """

    def __init__(
        self,
        model: Any,
        scale: int,
        inference: Mapping[str, Any] | InferenceConfig | None = None,
        *,
        device: str | None = None,
        threads: int | None = None,
        frame_batch: int = 4,
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
        self.scale, self.frame_batch = int(scale), max(1, int(frame_batch))
        self.upscaler = Upscaler.from_config(model, inference, device=device)
        self.errors = (*ITEM_ERRORS, *OUT_OF_MEMORY_ERRORS)
        logger.info("upscaling with %r", self.upscaler)

    def __call__(self, table: pa.Table) -> pa.Table:
        records, buffers = _rows(table)
        groups: dict[tuple[int, int, int], list[int]] = {}
        singles: list[int] = []
        for i, row in enumerate(records):
            if row["reason"]:
                continue
            if (
                (row.get("kind") or "image") == "image"
                and row["bit_depth"] == 8
                and not row["grey"]
                and not row["has_alpha"]
            ):
                groups.setdefault((row["pixel_height"], row["pixel_width"], self._scale(row)), []).append(i)
            else:
                singles.append(i)
        outputs: dict[int, DecodedImage] = {}
        frames: dict[int, bytes] = {}
        for i in list(singles):
            if (records[i].get("kind") or "image") != "image":
                singles.remove(i)
                if records[i].get("kind") == "part":
                    self._part(i, records, buffers, frames)
        for members in groups.values():
            if not self._group(members, records, buffers, outputs):
                singles.extend(members)  # retried one by one below
        for i in sorted(singles):
            self._one(i, records, buffers, outputs)
        for i, row in enumerate(records):
            row["pixels"] = frames.get(i)
            if i in outputs:
                row.update(pack_image(outputs[i]))
        return _image_table(records)

    def _scale(self, row: Mapping[str, Any]) -> int:
        """The row's own model scale (chosen by the decode stage for its output size), else the stage's."""
        return int(row.get("scale") or self.scale)

    def _part(self, i: int, records: list[dict], buffers: list, out: dict) -> None:
        """A video part: its frames through the images' inference path, ``frame_batch`` at a time."""
        start = time.perf_counter()
        row = records[i]
        try:
            upscaled = videos.upscale_frames(
                self.upscaler, videos.part_frames(row, buffers[i]), self.scale, self.frame_batch
            )  # (K, H*s, W*s, 3)
            out[i] = videos.frame_bytes(upscaled)
            row.update(pixel_width=upscaled.shape[2], pixel_height=upscaled.shape[1])
        except self.errors as exc:
            row["reason"] = reason_of(exc, row["input"])
            _free_cuda_cache()
        row["seconds"] += time.perf_counter() - start

    def _group(self, members: list[int], records: list[dict], buffers: list, outputs: dict) -> bool:
        start = time.perf_counter()
        try:
            images = np.stack([unpack_image(records[i], buffers[i]).rgb for i in members])  # (B, H, W, 3) uint8
            upscaled = self.upscaler.upscale_batch(images, self._scale(records[members[0]]))  # (B, H*s, W*s, 3)
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
            outputs[i] = self.upscaler.upscale_decoded(unpack_image(records[i], buffers[i]), self._scale(records[i]))
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


def finished_image(row: Mapping[str, Any], pixels: Any) -> DecodedImage:
    """The upscaled image of a row at its final size: resized here, in the CPU encode stage, never in the model's
    actor (:func:`edsr_ray.outsize.resize_decoded`; the model's pixels unchanged when it is that size already)."""
    image = unpack_image(row, pixels)
    if row.get("final_height") and row.get("final_width"):
        image = resize_decoded(image, (int(row["final_height"]), int(row["final_width"])))
    return image


def encode_output(image: DecodedImage, fmt: str, options: CodecOptions) -> bytes:
    """Encode an upscaled image as ``fmt`` (png, jpeg or webp) with the options' quality and PNG compression."""
    level = SMALL_PNG_LEVEL if options.png_compression == "small" else 1  # 1: fpng where it can
    return encode_image(image, fmt, quality=options.quality, png_compress_level=level)


def encode_and_write(
    dest: str, image: DecodedImage, options: CodecOptions, output_uri: str, cfg: StorageConfig | None = None
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
    options: Mapping[str, Any] | CodecOptions,
    storage_config: Mapping[str, Any] | None = None,
) -> pa.Table:
    """Image rows → manifest rows (:data:`RESULT_SCHEMA`): each upscaled image resized to its final size, encoded here
    and written by a few threads (so uploads overlap the next encode); rows that failed earlier, or fail now, become
    ``failed`` rows with their reason. A video part is encoded and written into its video's parts folder (its row tells
    the driver); a video row passes to the driver."""
    opts = _codec_options(options)
    cfg = storage_cfg(storage_config)
    records, buffers = _rows(images)
    rows: list[dict[str, Any]] = []
    pending: list[tuple[dict[str, Any], Any, float]] = []
    with ThreadPoolExecutor(max_workers=max(1, min(IO_THREADS, len(records)))) as pool:
        for rec, pixels in zip(records, buffers):
            row = {k: rec.get(k) for k in ("input", "output", "reason", "width", "height", "input_bytes", "seconds")}
            row["kind"] = kind = rec.get("kind") or "image"
            rows.append(row)
            if kind != "image":
                row.update({k: rec.get(k) for k in ("frames", "pts", "concealed", "job")})
                if kind == "part" and not row["reason"]:
                    start = time.perf_counter()
                    try:
                        check_destination(row["output"], output_uri)
                        row["bytes"] = videos.write_part(rec, pixels, cfg)[1]
                    except (*videos.VIDEO_ERRORS, ValueError) as exc:
                        row["reason"] = reason_of(exc, row["input"])
                    row["seconds"] = float(row["seconds"] or 0.0) + time.perf_counter() - start
                row["pts"] = row["pts"] if kind == "video" else None  # the driver needs a video's, not a part's
                continue
            if row["reason"]:
                continue
            start = time.perf_counter()
            try:
                data = encode_output(finished_image(rec, pixels), written_format(row["output"], opts.fmt), opts)
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
    return manifest_table(rows, RESULT_SCHEMA)


def _timed_write(dest: str, data: bytes, cfg: StorageConfig | None) -> tuple[BaseException | None, float]:
    start = time.perf_counter()
    try:
        storage.write_bytes(dest, data, cfg)
        return None, time.perf_counter() - start
    except ITEM_ERRORS as exc:
        return exc, time.perf_counter() - start
