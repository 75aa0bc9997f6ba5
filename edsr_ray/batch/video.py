"""Videos in the batch upscaling job: the work of each stage on video rows, and the join the driver starts.

A video travels through the same stages as images (:mod:`edsr_ray.batch.stages`), as rows of other kinds:

1. read + decode (CPU tasks): :func:`inspect_video` probes the video (limits checked from its headers), indexes its
   frames, cuts it into keyframe-aligned segments of parts (:func:`~edsr_ray.video.plan_segments`) and emits one
   ``video`` row (what the video is, every frame's pts) and one ``segment`` row per segment that has parts still to
   encode.
2. decode segments (CPU tasks): :func:`decode_segments` turns each segment row into ``part`` rows, one per part of at
   most K frames, one at a time (a generator: Ray Data holds back the next part while the model is busy).
3. model (the same actor pool as images): a part's frames go through ``Upscaler.upscale_batch`` in batches of the
   model stage's batch size (:func:`upscale_frames`).
4. encode + write (CPU tasks): :func:`write_part` encodes a part alone (one closed GOP, the input's pts) and writes
   it atomically under the video's hidden parts folder.
5. driver: :class:`VideoJoins` counts the parts of each video; once all exist, :func:`join_video` joins them with
   the input's audio and subtitle streams without re-encoding into a temporary file that is published at the output
   key in one step, then removes the parts.

Resume: parts live in ``<output folder>/.<output name>.parts/<fingerprint>/<segment>-<part>.nut``, where the
fingerprint covers the input (size and modification time or ETag), the model's weights, the scale, the inference
and encoding settings and the part size; a re-run after a kill decodes and encodes only the parts that are missing
(a segment none of whose parts is missing is not even decoded), and parts of other fingerprints are deleted. The
output key never holds a partial video: it appears by rename (local) or a completed upload (S3).

Memory: a part row holds at most ``part_bytes`` of upscaled frames (:func:`~edsr_ray.video.frames_per_part`), and the
pipeline holds a bounded number of rows whatever the video's length: about ``(2D + 3A + W + Q) x part_bytes + W x
encoder memory + A x model activations`` with D decode tasks, A model actors, W write tasks and Q parts queued
between stages (the README's "Video" section).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np

from edsr_ray import storage
from edsr_ray.batch.inputs import ITEM_ERRORS, check_destination, reason_of, storage_cfg
from edsr_ray.storage import StorageConfig
from edsr_ray.video import (
    OUTPUTS,
    VIDEO_SUFFIXES,
    EncodeSettings,
    Segment,
    VideoDecodeError,
    VideoInfo,
    VideoLimits,
    VideoOptions,
    build_index,
    choose_output,
    decode_parts,
    encode_part,
    encode_settings,
    frames_per_part,
    from_dict,
    join,
    plan_segments,
    probe,
    to_dict,
)
from edsr_ray.video.encode import PART_EXTENSION

logger = logging.getLogger(__name__)

PARTS_SUFFIX = ".parts"
# What a video's own content or storage can cause: one failed row, never the run. (The video library turns FFmpeg's
# errors into VideoError with the file's name; FFmpegError stays here for what may still slip through.)
VIDEO_ERRORS = (*ITEM_ERRORS, av.FFmpegError)


# --------------------------------------------------------------------------------------------------------------------
# Where parts live


def parts_root(dest: str) -> str:
    """The hidden folder next to the output key that holds a video's encoded parts while it is in progress."""
    head, name = posixpath.split(dest)
    return f"{head}/.{name}{PARTS_SUFFIX}"


def _source(uri: str, cfg: StorageConfig | None) -> Any:
    """What the video library reads: a local path as it is, an S3 object through a seekable ranged reader."""
    return storage.open_reader(uri, cfg) if storage.is_s3(uri) else os.fspath(storage.local_path(uri))


@contextlib.contextmanager
def _opened(uri: str, cfg: StorageConfig | None) -> Iterator[Any]:
    source = _source(uri, cfg)
    try:
        yield source
    finally:
        if hasattr(source, "close"):
            source.close()


def _identity(uri: str, source: Any) -> list[Any]:
    """What changes when the input changes: size and modification time (local) or size and ETag (S3)."""
    if isinstance(source, str):
        st = os.stat(source)
        return [uri, st.st_size, st.st_mtime_ns]
    return [uri, source.size, source.etag]


def _remove_tree(uri: str, cfg: StorageConfig | None) -> None:
    """Delete a parts folder and everything in it (best effort: leftovers are removed by the next run)."""
    try:
        if storage.is_s3(uri):
            for name in storage.list_files(uri, cfg):
                storage.delete(name, cfg)
        else:
            shutil.rmtree(storage.local_path(uri), ignore_errors=True)
    except ITEM_ERRORS as exc:
        logger.warning("cannot remove %s: %s", uri, exc)


def _existing_parts(folder: str, cfg: StorageConfig | None) -> set[str]:
    try:
        names = storage.list_files(folder, cfg)
    except storage.NotFoundError:
        return set()
    return {posixpath.basename(n).removesuffix(PART_EXTENSION) for n in names if n.endswith(PART_EXTENSION)}


def _stale_fingerprints(root: str, keep: str, cfg: StorageConfig | None) -> set[str]:
    try:
        names = storage.list_files(root, cfg)
    except storage.NotFoundError:
        return set()
    folders = {n[len(root) + 1 :].split("/", 1)[0] for n in names if n.startswith(root + "/")}
    return {f"{root}/{f}" for f in folders if f != keep}


# --------------------------------------------------------------------------------------------------------------------
# Stage 1: inspect


def output_for(dest: str, container: str, options: VideoOptions) -> str:
    """``dest`` with the extension of the container the video is written in, when its name suggests another one
    (the content decides: an .mp4 that holds Matroska keeps .mp4 only if it would be written as MP4 anyway)."""
    choice = choose_output(container, options.codec, options.container)
    stem, suffix = posixpath.splitext(dest)
    named = VIDEO_SUFFIXES.get(suffix.lower())
    if named is not None and choose_output(named, options.codec, options.container).format == choice.format:
        return dest
    return stem + choice.format.extension


def inspect_video(
    source_uri: str,
    dest: str,
    *,
    scale: int,
    options: VideoOptions,
    model_identity: str,
    cfg: StorageConfig | None = None,
) -> list[dict[str, Any]]:
    """The rows a video starts as: one ``video`` row, then one ``segment`` row per segment with parts to encode.

    A video that cannot be read (not a video, no video stream, over a limit, truncated, ...) is one ``video`` row
    with the reason.
    """
    start = time.perf_counter()
    row: dict[str, Any] = {"kind": "video", "input": source_uri, "output": dest, "reason": ""}
    try:
        with _opened(source_uri, cfg) as source:
            limits = options.limits
            info = probe(source, limits, name=source_uri)
            index = build_index(source, info, limits, name=source_uri)
            identity = _identity(source_uri, source)
        k = frames_per_part(info, scale, options)
        segments = plan_segments(index, k)
        settings = encode_settings(info, options, scale)
        choice = choose_output(info.container, options.codec, options.container)
        dest = output_for(dest, info.container, options)
        fingerprint = hashlib.sha256(
            json.dumps([identity, model_identity, scale, to_dict(settings), k, choice.format.name]).encode()
        ).hexdigest()[:16]
        root = parts_root(dest)
        folder = f"{root}/{fingerprint}"
        for stale in _stale_fingerprints(root, fingerprint, cfg):
            _remove_tree(stale, cfg)
        existing = _existing_parts(folder, cfg)
    except VIDEO_ERRORS as exc:
        row.update(reason=reason_of(exc, source_uri), seconds=time.perf_counter() - start)
        return [row]
    keys = [p.key for s in segments for p in s.parts]
    notes = list(info.notes) + list(settings.notes)
    if choice.note:
        notes.append(choice.note)
    if index.leading:
        notes.append(f"{index.leading} frame(s) before the first keyframe left out: they cannot be decoded")
    job = {
        "info": to_dict(info),
        "settings": to_dict(settings),
        "output_format": choice.format.name,
        "folder": folder,
        "parts": keys,
        "todo": sum(key not in existing for key in keys),
        "segments": len(segments),
        "notes": notes,
    }
    row.update(
        output=dest,
        width=info.width,
        height=info.height,
        frames=len(index.pts),
        pts=list(index.pts),
        input_bytes=identity[1],
        job=json.dumps(job),
    )
    rows = [row]
    shared = {"info": job["info"], "settings": job["settings"], "folder": folder}
    for segment in segments:
        skip = [p.key for p in segment.parts if p.key in existing]
        if len(skip) == len(segment.parts):
            continue  # every part of this segment exists: nothing to decode
        rows.append(
            {
                "kind": "segment",
                "input": source_uri,
                "output": dest,
                "reason": "",
                "frames": segment.frames,
                "job": json.dumps({**shared, "segment": to_dict(segment), "skip": skip}),
            }
        )
    row["seconds"] = time.perf_counter() - start
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Stage 2: decode segments into parts


def decode_segment_rows(
    row: Mapping[str, Any], options: VideoOptions, cfg: StorageConfig | None = None
) -> Iterator[dict[str, Any]]:
    """The ``part`` rows of one ``segment`` row, one at a time (each holds one part's frames). A decoding error ends
    the segment with one part row carrying the reason (the video then fails, naming it)."""
    job = json.loads(row["job"])
    info = from_dict(VideoInfo, job["info"])
    segment = from_dict(Segment, job["segment"])
    part_job = {"settings": job["settings"], "folder": job["folder"]}
    base = {"kind": "part", "input": row["input"], "output": row["output"], "reason": ""}
    start = time.perf_counter()
    try:
        with _opened(row["input"], cfg) as source:
            for decoded in decode_parts(
                source,
                info,
                segment,
                options.limits,
                skip=job["skip"],
                on_decode_error=options.on_decode_error,
                name=row["input"],
            ):
                frames = decoded.frames  # (K, H, W, 3) uint8 or uint16
                yield {
                    **base,
                    "frames": frames.shape[0],
                    "pts": list(decoded.part.pts),
                    "concealed": decoded.concealed,
                    "pixel_width": frames.shape[2],
                    "pixel_height": frames.shape[1],
                    "bit_depth": 16 if frames.dtype == np.uint16 else 8,
                    "grey": False,
                    "has_alpha": False,
                    "mode": "RGB",
                    "pixels": frame_bytes(frames),
                    "job": json.dumps({**part_job, "key": decoded.part.key}),
                    "seconds": time.perf_counter() - start,
                }
                start = time.perf_counter()
    except VIDEO_ERRORS as exc:
        reason = reason_of(exc, row["input"])
        if isinstance(exc, VideoDecodeError) and options.on_decode_error == "fail":
            reason += "; with --on-decode-error conceal, frames that cannot be decoded repeat the frame before"
        yield {**base, "reason": reason, "frames": 0, "seconds": time.perf_counter() - start}


def frame_bytes(frames: np.ndarray) -> bytes:
    dtype = "<u2" if frames.dtype == np.uint16 else np.uint8
    return np.ascontiguousarray(frames, dtype=dtype).tobytes()


def part_frames(row: Mapping[str, Any], pixels: Any) -> np.ndarray:
    """A part row's frames as (K, H, W, 3) read-only views of ``pixels`` (bytes or an Arrow buffer)."""
    k, h, w = int(row["frames"]), int(row["pixel_height"]), int(row["pixel_width"])
    wide = int(row["bit_depth"]) == 16
    flat = np.frombuffer(pixels, dtype=np.dtype("<u2") if wide else np.uint8)
    if flat.size != k * h * w * 3:
        raise ValueError(f"{row['input']}: {flat.size} samples in a part row, expected {k * h * w * 3}")
    return flat.reshape(k, h, w, 3).astype(np.uint16 if wide else np.uint8, copy=False)


# --------------------------------------------------------------------------------------------------------------------
# Stage 3: the model


def upscale_frames(upscaler: Any, frames: np.ndarray, scale: int, batch: int) -> np.ndarray:
    """(K, H, W, 3) frames -> (K, H*s, W*s, 3) of the same dtype, through the images' inference path: 8-bit frames in
    batches of ``batch`` (:meth:`Upscaler.upscale_batch`), deeper ones one by one (:meth:`Upscaler.upscale_decoded`
    keeps 16 bits)."""
    from edsr_ray.codecs import DecodedImage

    k, h, w, _ = frames.shape
    out = np.empty((k, h * scale, w * scale, 3), frames.dtype)
    if frames.dtype == np.uint8:
        for i in range(0, k, batch):
            out[i : i + batch] = upscaler.upscale_batch(frames[i : i + batch].copy(), scale)  # torch wants writable
    else:
        for i in range(k):
            out[i] = upscaler.upscale_decoded(DecodedImage(frames[i], None, 16, False, None, "RGB"), scale).rgb
    return out


# --------------------------------------------------------------------------------------------------------------------
# Stage 4: encode + write a part


def write_part(row: Mapping[str, Any], pixels: Any, cfg: StorageConfig | None = None) -> tuple[str, int]:
    """Encode a part row's upscaled frames and write them atomically into the video's parts folder; returns (the
    part's URI, its size)."""
    job = json.loads(row["job"])
    settings = from_dict(EncodeSettings, job["settings"])
    buffer = io.BytesIO()
    encode_part(buffer, part_frames(row, pixels), list(row["pts"]), settings)
    uri = f"{job['folder']}/{job['key']}{PART_EXTENSION}"
    storage.write_bytes(uri, buffer.getbuffer(), cfg)
    return uri, buffer.tell()


# --------------------------------------------------------------------------------------------------------------------
# Driver: the join


@dataclass
class _Video:
    row: dict[str, Any]
    job: dict[str, Any]
    done: int = 0
    concealed: int = 0
    seconds: float = 0.0
    reason: str = ""
    joining: bool = False


@dataclass
class VideoJoins:
    """The driver's account of the videos in flight: parts counted as their rows arrive; a video whose parts all
    exist is ready to join (:meth:`ready`); one whose part failed, or whose parts never all arrived, becomes a failed
    manifest row (:meth:`finish`)."""

    videos: dict[str, _Video] = field(default_factory=dict)
    frames_total: int = 0
    frames_done: int = 0

    def add(self, row: Mapping[str, Any]) -> dict[str, Any] | None:
        """Take a row of the write stage; returns a manifest row when the row is a video that failed at once."""
        kind = row.get("kind")
        if kind == "video":
            if row["reason"]:
                return manifest_row(dict(row), None)
            video = self.videos.setdefault(row["output"], _Video({}, {}))
            video.row, video.job = dict(row), json.loads(row["job"])
            video.seconds += float(row.get("seconds") or 0.0)
            self.frames_total += int(row["frames"] or 0)
            # Frames whose parts an earlier run encoded count as done already.
            reused = len(video.job["parts"]) - video.job["todo"]
            if reused:
                self.frames_done += int(row["frames"] or 0) * reused // max(1, len(video.job["parts"]))
        elif kind == "part":
            video = self.videos.setdefault(row["output"], _Video({}, {}))
            video.seconds += float(row.get("seconds") or 0.0)
            if row["reason"]:
                video.reason = video.reason or row["reason"]
            else:
                video.done += 1
                video.concealed += int(row.get("concealed") or 0)
                self.frames_done += int(row["frames"] or 0)
        return None

    def ready(self) -> list[dict[str, Any]]:
        """Join requests of the videos whose parts all exist (each returned once)."""
        out = []
        for video in self.videos.values():
            if video.job and not video.joining and not video.reason and video.done == video.job["todo"]:
                video.joining = True
                out.append(self._request(video))
        return out

    def _request(self, video: _Video) -> dict[str, Any]:
        return {
            "row": {k: v for k, v in video.row.items() if k not in ("pts", "job")},
            "pts": video.row["pts"],
            "job": video.job,
            "concealed": video.concealed,
            "seconds": video.seconds,
        }

    def finish(self) -> list[dict[str, Any]]:
        """Manifest rows of the videos that will not be joined: a part failed, or parts are missing."""
        rows = []
        for video in self.videos.values():
            if video.joining or not video.row:
                continue
            reason = video.reason or (
                f"{video.row['input']}: {video.job['todo'] - video.done} of its {video.job['todo']} parts were not "
                "encoded"
            )
            rows.append(manifest_row({**video.row, "reason": reason, "seconds": video.seconds}, video.job))
        return rows


def manifest_row(row: dict[str, Any], job: Mapping[str, Any] | None, concealed: int = 0) -> dict[str, Any]:
    """A video's row of ``_manifest.parquet`` (status from its reason)."""
    out = {k: row.get(k) for k in ("input", "output", "reason", "width", "height", "bytes", "input_bytes", "seconds")}
    out.update(kind="video", status="failed" if row.get("reason") else "ok", frames=row.get("frames"))
    if job:
        info = job["info"]
        settings = job["settings"]
        out.update(
            duration_s=info.get("duration_s"),
            fps=_fps(info.get("frame_rate")),
            codec_in=info["codec"],
            codec_out=settings["codec"],
            container_out=job["output_format"],
            pix_fmt_out=settings["pix_fmt"],
            segments=job["segments"],
            parts=len(job["parts"]),
            parts_reused=len(job["parts"]) - job["todo"],
            concealed_frames=concealed,
            notes=list(job["notes"]),
        )
    return out


def _fps(rate: str | None) -> float | None:
    if not rate:
        return None
    num, _, den = str(rate).partition("/")
    return float(num) / float(den or 1)


def join_video(
    request: Mapping[str, Any], output_uri: str, storage_config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Join a video's parts and the input's other streams into its output, published in one step; returns its
    manifest row. The parts folder is removed after a successful join and kept (for the next run) otherwise."""
    cfg = storage_cfg(storage_config)
    row, job = dict(request["row"]), request["job"]
    start = time.perf_counter()
    dest = row["output"]
    info = from_dict(VideoInfo, job["info"])
    settings = from_dict(EncodeSettings, job["settings"])
    # The input was checked when inspected; the join reads it again and reads back the upscaled output.
    limits = VideoLimits(max_pixels=max(info.width * info.height, settings.width * settings.height))
    parts = [f"{job['folder']}/{key}{PART_EXTENSION}" for key in job["parts"]]
    tmp_dir = None
    try:
        if storage.is_s3(dest):
            tmp_dir = tempfile.mkdtemp(prefix="edsr-join-")
            tmp = os.path.join(tmp_dir, "joined" + OUTPUTS[job["output_format"]].extension)
        else:
            check_destination(dest, output_uri)
            head, name = os.path.split(os.fspath(storage.local_path(dest)))
            tmp = os.path.join(head, f".{name}.{uuid.uuid4().hex}{storage.TMP_SUFFIX}")
        with contextlib.ExitStack() as stack:
            sources = [stack.enter_context(_opened(p, cfg)) for p in parts]
            source = stack.enter_context(_opened(row["input"], cfg))
            result = join(
                sources,
                tmp,
                source=source,
                info=info,
                settings=settings,
                output=OUTPUTS[job["output_format"]],
                limits=limits,
                expected_pts=request["pts"],
                name=row["input"],
            )
        if tmp_dir is None:
            os.replace(tmp, storage.local_path(dest))
        else:
            storage.write_file(dest, tmp, cfg)
        row.update(bytes=result.size, reason="")
        job = {**job, "notes": list(dict.fromkeys([*job["notes"], *result.notes]))}
        _remove_tree(parts_root(dest), cfg)
    except VIDEO_ERRORS as exc:
        row["reason"] = reason_of(exc, row["input"])
        if tmp_dir is None:
            with contextlib.suppress(OSError, UnboundLocalError):
                os.unlink(tmp)
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    row["seconds"] = float(request["seconds"]) + time.perf_counter() - start
    return manifest_row(row, job, int(request["concealed"]))
