"""Opening a video safely and reading what it is, with bounded work whatever the file claims.

:func:`open_input` is the one way this library opens an input: the demuxer is the one the content sniffing found
(FFmpeg never guesses, so playlists and concat lists that name other files are never followed), probing reads at
most :data:`PROBE_BYTES`, nested opens may use only local files, and the decoders refuse frames larger than the
pixel limit inside FFmpeg, before allocating them (a stream may announce a small size and switch to a huge one).

:func:`probe` checks the limits from the headers before any frame is decoded, then decodes one frame for what only
frames carry in PyAV (rotation, interlacing, HDR metadata), and returns a :class:`VideoInfo`.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO

import av
import av.logging
import av.sidedata.sidedata

from edsr_ray import storage
from edsr_ray.video.containers import CONTAINERS, HEAD_BYTES, Container, sniff_container
from edsr_ray.video.errors import VideoDecodeError, VideoError, VideoTooLargeError
from edsr_ray.video.frames import Colour, is_rgb_format
from edsr_ray.video.options import VideoLimits

Source = str | os.PathLike | BinaryIO
"""A local path, or a seekable binary file object (``io.BytesIO`` of an upload, ``storage.open_reader`` of an S3
object). File objects are rewound before each use."""

PROBE_BYTES = 10 << 20  # bytes FFmpeg may read while finding the streams
PROBE_MICROSECONDS = 10_000_000  # stream time it may analyse for that
_SIDE_DATA = av.sidedata.sidedata.Type


@dataclass(frozen=True)
class VideoInfo:
    """What a video is, from its headers and its first frame.

    ``container`` is the sniffed container's name (:data:`~edsr_ray.video.containers.CONTAINERS`); ``codec`` the
    codec's name ("h264", "hevc", "vp9", "av1", ...); ``bit_depth`` the bits per sample of ``pix_fmt``;
    ``time_base`` the video stream's (every pts is in it); ``frame_rate`` its average rate (None when unknown);
    ``frames`` the frame count the header declares (0 when it declares none: Matroska, MPEG-TS); ``duration_s`` the
    declared duration; ``display_matrix`` the 3x3 rotation/flip matrix (FFmpeg's layout) players apply, and
    ``rotation`` its angle in degrees counter-clockwise; ``streams`` describes the file's other streams
    ("audio #1 aac"); ``notes`` what will not be carried to the output (HDR10 metadata, interlacing, ...).
    """

    container: str
    codec: str
    width: int
    height: int
    pix_fmt: str
    bit_depth: int
    time_base: Fraction
    frame_rate: Fraction | None
    frames: int
    duration_s: float | None
    start_pts: int | None
    colour: Colour
    sample_aspect_ratio: Fraction | None = None
    display_matrix: tuple[int, ...] | None = None
    rotation: float = 0.0
    stream_index: int = 0
    streams: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def assumed_colour(self) -> Colour:
        """The colour the pixels are converted with: :meth:`Colour.assumed` for this stream's size and format."""
        return self.colour.assumed(self.height, is_rgb_format(self.pix_fmt))


def source_name(source: Source, name: str | None) -> str:
    """How messages name ``source``: ``name`` when given (an input key or URI), else its path or file name."""
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return str(getattr(source, "name", None) or "the video")


def read_head(source: Source, size: int = HEAD_BYTES) -> bytes:
    """The first ``size`` bytes of a path (a regular file: anything else fails by name) or a file object."""
    if isinstance(source, (str, os.PathLike)):
        return storage.read_head(source, size)[0]
    source.seek(0)
    head = source.read(size)
    source.seek(0)
    return head


def container_of(source: Source, name: str | None = None) -> Container:
    """The sniffed container of ``source``; a :class:`VideoError` when it is none this library reads."""
    found = sniff_container(read_head(source))
    if found is None:
        raise VideoError(f"{source_name(source, name)}: not a video in a container this library reads")
    return found


def ffmpeg_reason(exc: av.FFmpegError) -> str:
    """FFmpeg's reason for a failure, without the file name PyAV appends (a local temporary path, often)."""
    reason = getattr(exc, "strerror", None) or str(exc)
    log = getattr(exc, "log", None)
    if log and isinstance(log, tuple) and len(log) >= 3 and log[2]:
        reason = f"{reason} ({str(log[2]).strip()})"
    return reason


@contextlib.contextmanager
def open_input(
    source: Source, container: Container, max_pixels: int, *, name: str | None = None
) -> Iterator[av.container.InputContainer]:
    """Open ``source`` with ``container``'s demuxer forced, bounded probing, local-only nested opens and the
    decoders' pixel limit. A failure to open is a :class:`VideoError` naming the file."""
    name = source_name(source, name)
    _log_ffmpeg_errors()
    if container.demuxer is None:
        raise VideoError(
            f"{name}: {container.description} has no container around it; this library reads videos in "
            f"containers ({', '.join(c for c, v in CONTAINERS.items() if v.demuxer)})"
        )
    if isinstance(source, (str, os.PathLike)):
        storage.check_regular_file(source)
        target: str | BinaryIO = ffmpeg_url(source)
    else:
        source.seek(0)
        target = source
    options = {
        "probesize": str(PROBE_BYTES),
        "analyzeduration": str(PROBE_MICROSECONDS),
        "max_pixels": str(max_pixels),
        "protocol_whitelist": "file,pipe",
    }
    try:
        handle = av.open(target, format=container.demuxer, options=options)
    except av.FFmpegError as exc:
        raise VideoError(f"{name}: cannot open {container.description}: {ffmpeg_reason(exc)}") from None
    try:
        yield handle
    finally:
        handle.close()


def ffmpeg_url(path: str | os.PathLike) -> str:
    """A local path (or file:// URI) as FFmpeg must get it: with the file protocol spelled out, so that a name such
    as "concat:a|b" or "http:x" is a file name, never a protocol."""
    return "file:" + os.path.abspath(storage.local_path(path))


def _log_ffmpeg_errors() -> None:
    """Let FFmpeg's own error messages (why a decoder refused a frame, which packet is corrupt) reach Python logging
    and the text of PyAV's exceptions; PyAV silences them by default. Process-wide, errors only, set once."""
    if av.logging.get_level() is None:
        av.logging.set_level(av.logging.ERROR)


def video_stream(handle: av.container.InputContainer, name: str, max_pixels: int, threads: int = 1) -> av.VideoStream:
    """The video stream to upscale (the first one that is not a cover picture), set up for bounded decoding: its
    decoder refuses frames over ``max_pixels`` and uses ``threads`` threads; the other streams are not read."""
    candidates = [s for s in handle.streams.video if not _is_cover(s)]
    if not candidates:
        held = ", ".join(_describe(s) for s in handle.streams) or "nothing"
        raise VideoError(f"{name}: no video stream (the file holds: {held})")
    stream = candidates[0]
    if stream.codec_context is None:
        raise VideoError(f"{name}: no decoder for its video codec ({stream.codec_tag or 'unknown'})")
    # The limit passed to av.open reaches only the decoders FFmpeg opens while probing, not this one.
    stream.codec_context.options = {"max_pixels": str(max_pixels)}
    stream.codec_context.thread_count = threads
    for other in handle.streams:
        if other is not stream:
            other.discard = av.stream.Discard.all
    return stream


def _is_cover(stream: av.stream.Stream) -> bool:
    return bool(stream.disposition & av.stream.Disposition.attached_pic)


def _describe(stream: av.stream.Stream) -> str:
    if _is_cover(stream):
        return f"{stream.type} #{stream.index} cover picture"
    return f"{stream.type} #{stream.index} {codec_name(stream) or 'unknown codec'}"


def codec_name(stream: av.stream.Stream) -> str | None:
    """The codec's own name ("mp3", "subrip", "av1"), not its decoder's ("mp3float", "srt", "libdav1d")."""
    ctx = stream.codec_context
    return ctx.codec.canonical_name if ctx is not None and ctx.codec is not None else None


def probe(source: Source, limits: VideoLimits, *, name: str | None = None) -> VideoInfo:
    """What ``source`` is, refusing it with a :class:`VideoError` naming the reason: not a video container, cannot be
    opened, no video stream, no decoder, over a limit (:class:`VideoTooLargeError`), first frame undecodable.

    Work is bounded: the head is sniffed, the container opened with the limits of :func:`open_input`, sizes,
    frame count and duration are checked from the headers, and one frame is decoded.
    """
    name = source_name(source, name)
    container = container_of(source, name)
    with open_input(source, container, limits.max_pixels, name=name) as handle:
        stream = video_stream(handle, name, limits.max_pixels)
        ctx = stream.codec_context
        width, height = ctx.width, ctx.height
        if width <= 0 or height <= 0:
            raise VideoError(
                f"{name}: the video stream has no valid frame size (none declared, or one FFmpeg refuses as absurd)"
            )
        check_pixels(width, height, limits.max_pixels, name)
        duration = _duration(handle, stream)
        if duration is not None and duration > limits.max_seconds:
            raise VideoTooLargeError(
                f"{name}: the video lasts {duration:,.0f} s, over the limit of {limits.max_seconds:,.0f} s"
            )
        if stream.frames > limits.max_frames:
            raise VideoTooLargeError(
                f"{name}: the video declares {stream.frames:,} frames, over the limit of {limits.max_frames:,}"
            )
        first = _first_frame(handle, stream, name)
        if (first.width, first.height) != (width, height):
            check_pixels(first.width, first.height, limits.max_pixels, name)
            width, height = first.width, first.height
        pix_fmt = first.format.name
        return VideoInfo(
            container=container.name,
            codec=codec_name(stream) or "unknown",
            width=width,
            height=height,
            pix_fmt=pix_fmt,
            bit_depth=max(c.bits for c in first.format.components),
            time_base=stream.time_base,
            frame_rate=stream.average_rate or stream.guessed_rate or None,
            frames=int(stream.frames),
            duration_s=duration,
            start_pts=stream.start_time,
            colour=_colour(ctx, first),
            sample_aspect_ratio=stream.sample_aspect_ratio or None,
            display_matrix=_display_matrix(first),
            rotation=float(first.rotation),
            stream_index=stream.index,
            streams=tuple(_describe(s) for s in handle.streams if s is not stream),
            notes=tuple(_frame_notes(first)),
        )


def check_pixels(width: int, height: int, max_pixels: int, name: str) -> None:
    """A :class:`VideoTooLargeError` when a frame of ``width`` x ``height`` is over the per-frame pixel limit."""
    if width * height > max_pixels:
        raise VideoTooLargeError(
            f"{name}: {width}x{height} = {width * height:,} pixels per frame, over the limit of {max_pixels:,}"
        )


def _duration(handle: av.container.InputContainer, stream: av.VideoStream) -> float | None:
    if stream.duration is not None and stream.time_base:
        return float(stream.duration * stream.time_base)
    if handle.duration is not None:
        return handle.duration / av.time_base
    return None


def _first_frame(handle: av.container.InputContainer, stream: av.VideoStream, name: str) -> av.VideoFrame:
    try:
        for frame in handle.decode(stream):
            return frame
    except av.FFmpegError as exc:
        raise VideoDecodeError(f"{name}: the first video frame cannot be decoded: {ffmpeg_reason(exc)}") from None
    raise VideoError(f"{name}: the video stream holds no decodable frame")


def _colour(ctx: av.codec.context.CodecContext, frame: av.VideoFrame) -> Colour:
    """The stream's colour description; fields the stream leaves unspecified are taken from the first frame."""
    stream, first = Colour.of(ctx), Colour.of(frame)
    return Colour(
        stream.primaries if stream.primaries != 2 else first.primaries,
        stream.transfer if stream.transfer != 2 else first.transfer,
        stream.matrix if stream.matrix != 2 else first.matrix,
        stream.range or first.range,
    )


def _display_matrix(frame: av.VideoFrame) -> tuple[int, ...] | None:
    """The display matrix the demuxer attached to the stream (PyAV shows it on decoded frames only)."""
    for data in frame.side_data:
        if data.type == _SIDE_DATA.DISPLAYMATRIX:
            return struct.unpack("=9i", bytes(data))
    return None


def _frame_notes(frame: av.VideoFrame) -> Iterator[str]:
    if frame.interlaced_frame:
        yield "interlaced video upscaled as progressive frames (no deinterlacing)"
    kinds = {data.type for data in frame.side_data}
    if kinds & {_SIDE_DATA.MASTERING_DISPLAY_METADATA, _SIDE_DATA.CONTENT_LIGHT_LEVEL}:
        yield "HDR10 mastering display / light level metadata not carried to the output (colour tags are)"
    if kinds & {_SIDE_DATA.DOVI_RPU_BUFFER, _SIDE_DATA.DOVI_METADATA, _SIDE_DATA.DYNAMIC_HDR_PLUS}:
        yield "dynamic HDR metadata (Dolby Vision / HDR10+) not carried to the output"
