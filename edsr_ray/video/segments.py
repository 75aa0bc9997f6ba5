"""Cutting a video into pieces that decode independently, and decoding one piece exactly.

* :func:`build_index` reads every video packet's timestamp and keyframe flag without decoding (the file is read
  once, nothing is decoded) and checks the frame-count and duration limits and truncation against them.
* :func:`plan_segments` cuts the frames into *segments*, the presentation-time ranges [k_i, k_(i+1)) between chosen
  keyframes, each decoded on its own, and each segment into *parts* of at most K frames. A part is the unit of
  encoding: it becomes one closed group of pictures, encoded by a fresh encoder (:mod:`edsr_ray.video.encode`).
* :func:`decode_segment` yields exactly the frames of one segment, converted to RGB: it seeks to the segment's
  keyframe (by byte position in formats whose timestamp seeks are not exact), drops frames before the segment
  (leading pictures of an open GOP belong to the previous one) and stops at the first frame at or after its end
  (not at the next keyframe *packet*: the decoder must be fed past it to output those leading pictures). Every frame
  is checked against the index, so no frame is lost or duplicated at a boundary; a seek that lands wrong is detected
  before anything is yielded and the segment is decoded from the file's start instead.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from edsr_ray.video.containers import CONTAINERS, Container
from edsr_ray.video.errors import VideoDecodeError, VideoError, VideoTooLargeError
from edsr_ray.video.frames import to_rgb
from edsr_ray.video.options import VideoLimits, VideoOptions
from edsr_ray.video.probe import Source, VideoInfo, ffmpeg_reason, open_input, source_name, video_stream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Index:
    """Every frame's pts of a video stream (presentation order) and its keyframes.

    ``positions[i]`` is the byte position of keyframe ``keyframes[i]``'s packet (-1 when the demuxer does not say).
    ``leading`` counts frames before the first keyframe: they reference pictures the file does not hold, cannot be
    decoded reliably and are left out of :attr:`pts`.
    """

    time_base: Fraction
    pts: tuple[int, ...]
    keyframes: tuple[int, ...]
    positions: tuple[int, ...]
    leading: int = 0

    @property
    def frames(self) -> int:
        return len(self.pts)

    def seconds(self, pts: int) -> float:
        return float(pts * self.time_base)


def build_index(source: Source, info: VideoInfo, limits: VideoLimits, *, name: str | None = None) -> Index:
    """Demux the video stream of ``source`` (probed as ``info``) without decoding; a :class:`VideoError` when its
    packets carry no timestamps or repeat one, it is truncated (fewer frames than the header declares), or it has no
    keyframe, and a :class:`VideoTooLargeError` when it holds more frames or seconds than ``limits`` allow."""
    name = source_name(source, name)
    pts: list[int] = []
    keys: list[tuple[int, int]] = []
    with open_input(source, CONTAINERS[info.container], limits.max_pixels, name=name) as handle:
        stream = video_stream(handle, name, limits.max_pixels)
        try:
            for packet in handle.demux(stream):
                if not packet.size or packet.is_discard:  # the end-of-file flush; samples an edit list cuts out
                    continue
                if packet.pts is None:
                    raise VideoError(
                        f"{name}: its video packets carry no timestamps ({info.container}); remux it into MP4 or "
                        "Matroska first"
                    )
                pts.append(packet.pts)
                if len(pts) > limits.max_frames:
                    raise VideoTooLargeError(f"{name}: more than {limits.max_frames:,} frames, the limit")
                if packet.is_keyframe:
                    keys.append((packet.pts, packet.pos if packet.pos is not None and packet.pos >= 0 else -1))
        except av.FFmpegError as exc:
            raise VideoError(
                f"{name}: cannot read the file after {len(pts)} frames: {ffmpeg_reason(exc)} (corrupt or truncated)"
            ) from None
    if info.frames and len(pts) < info.frames:
        raise VideoError(f"{name}: truncated: the file holds {len(pts)} of the {info.frames} frames its header lists")
    if not keys:
        raise VideoError(f"{name}: the video stream has no keyframe to start decoding from")
    pts.sort()
    for a, b in itertools.pairwise(pts):
        if a == b:
            raise VideoError(f"{name}: two frames have the same timestamp ({a} x {stream.time_base})")
    keys.sort()
    span = float((pts[-1] - pts[0]) * stream.time_base)
    if span > limits.max_seconds:
        raise VideoTooLargeError(f"{name}: the video lasts {span:,.0f} s, over the limit of {limits.max_seconds:,.0f}s")
    leading = bisect.bisect_left(pts, keys[0][0])
    return Index(stream.time_base, tuple(pts[leading:]), tuple(k for k, _ in keys), tuple(p for _, p in keys), leading)


@dataclass(frozen=True)
class Part:
    """Consecutive frames of one segment (their pts, in presentation order), encoded together as one closed GOP.
    ``key`` names its file: parts sort by it in presentation order."""

    segment: int
    number: int
    pts: tuple[int, ...]

    @property
    def key(self) -> str:
        return f"{self.segment:06d}-{self.number:04d}"

    @property
    def frames(self) -> int:
        return len(self.pts)


@dataclass(frozen=True)
class Segment:
    """The frames with ``start`` <= pts < ``end`` (None: to the end), decoded from the keyframe at ``start``, whose
    packet sits at byte ``position`` (-1 unknown); cut into ``parts``."""

    number: int
    start: int
    end: int | None
    position: int
    parts: tuple[Part, ...]

    @property
    def pts(self) -> tuple[int, ...]:
        return tuple(p for part in self.parts for p in part.pts)

    @property
    def frames(self) -> int:
        return sum(part.frames for part in self.parts)


def frames_per_part(info: VideoInfo, scale: int, options: VideoOptions) -> int:
    """K, the most frames one part holds: as many upscaled frames as fit in ``options.part_bytes``, at most
    ``options.part_seconds`` of video, at least one. K bounds the memory a part takes between stages."""
    sample_bytes = 1 if info.bit_depth <= 8 else 2
    frame_bytes = info.width * scale * info.height * scale * 3 * sample_bytes
    rate = info.frame_rate if info.frame_rate else Fraction(30)
    return max(1, min(options.part_bytes // frame_bytes, math.ceil(options.part_seconds * rate)))


def plan_segments(index: Index, part_frames: int, min_segment_frames: int | None = None) -> tuple[Segment, ...]:
    """Segments starting at keyframes, each at least ``min_segment_frames`` long (default ``part_frames``; the last
    one may be shorter), neighbouring GOPs merged until then, so that all-intra streams are not cut into one-frame
    segments; each cut into parts of ``part_frames`` (a segment's last part may be shorter)."""
    if part_frames < 1:
        raise ValueError(f"part_frames must be >= 1, got {part_frames}")
    minimum = part_frames if min_segment_frames is None else max(1, min_segment_frames)
    pts = index.pts
    starts = [0]  # indices into pts (the first keyframe is pts[0])
    bounds = [(index.keyframes[0], index.positions[0])]
    for key, position in zip(index.keyframes[1:], index.positions[1:]):
        at = bisect.bisect_left(pts, key)
        if at - starts[-1] >= minimum:
            starts.append(at)
            bounds.append((key, position))
    segments = []
    for number, (lo, (start, position)) in enumerate(zip(starts, bounds)):
        hi = starts[number + 1] if number + 1 < len(starts) else len(pts)
        parts = tuple(
            Part(number, n, pts[a : min(a + part_frames, hi)]) for n, a in enumerate(range(lo, hi, part_frames))
        )
        end = pts[hi] if hi < len(pts) else None
        segments.append(Segment(number, start, end, position, parts))
    return tuple(segments)


@dataclass(frozen=True, eq=False)
class DecodedFrame:
    """One frame of a segment: its pts, its pixels as (H, W, 3) uint8/uint16 RGB, and whether it is a copy of the
    previous frame standing in for one that could not be decoded (``on_decode_error="conceal"``)."""

    pts: int
    rgb: np.ndarray
    concealed: bool = False


@dataclass(frozen=True, eq=False)
class DecodedPart:
    """The frames of one part stacked as (K, H, W, 3), and how many of them are concealed copies."""

    part: Part
    frames: np.ndarray
    concealed: int = 0


class _SeekMissed(Exception):
    """The seek landed after the segment's keyframe: decoding from there would lose frames."""


def decode_segment(
    source: Source,
    info: VideoInfo,
    segment: Segment,
    limits: VideoLimits,
    *,
    on_decode_error: str = "fail",
    threads: int = 1,
    name: str | None = None,
) -> Iterator[DecodedFrame]:
    """The frames of ``segment`` in presentation order, each with its pts, converted with the stream's colour.

    Guarantees: exactly one frame per pts of the segment, in order (the index's pts, so segments decoded apart add up
    to the whole video); frames of ``info``'s size (a size change mid-stream is a :class:`VideoError`, as are frames
    over the pixel limit, refused by the decoder). A decode error or a frame that does not come is a
    :class:`VideoDecodeError` naming its time with ``on_decode_error="fail"``; with ``"conceal"`` the previous good
    frame stands in for it (:attr:`DecodedFrame.concealed`). ``threads``: decoder and conversion threads.
    """
    name = source_name(source, name)
    container = CONTAINERS[info.container]
    conceal = on_decode_error == "conceal"
    expected = segment.pts
    # The first segment starts at the first keyframe: decoding from the file's start needs no seek.
    for seek in (True, False) if segment.number > 0 else (False,):
        frames = _decoded(source, info, container, segment, limits.max_pixels, seek, conceal, threads, name)
        try:
            first = next(frames, None)
        except _SeekMissed as exc:
            log.warning("%s: %s; decoding segment %d from the start of the file", name, exc, segment.number)
            continue
        if seek and (first is None or first.pts != expected[0]):
            frames.close()
            log.warning(
                "%s: the seek to segment %d did not deliver its first frame; decoding from the file's start",
                name,
                segment.number,
            )
            continue
        checked = _Checked(info, expected, conceal, threads, name)
        yield from checked.frames(_prepend(first, frames))
        return


def _prepend(first: av.VideoFrame | None, rest: Iterator[av.VideoFrame]) -> Iterator[av.VideoFrame]:
    if first is not None:
        yield first
    yield from rest


def _decoded(
    source: Source,
    info: VideoInfo,
    container: Container,
    segment: Segment,
    max_pixels: int,
    seek: bool,
    conceal: bool,
    threads: int,
    name: str,
) -> Iterator[av.VideoFrame]:
    """Decoded frames with ``segment.start`` <= pts < ``segment.end``, in the decoder's (presentation) order."""
    with open_input(source, container, max_pixels, name=name) as handle:
        stream = video_stream(handle, name, max_pixels, threads)
        if seek:
            if container.seek_by_bytes and segment.position >= 0:
                handle.seek(segment.position, unsupported_byte_offset=True)
            else:
                handle.seek(segment.start, stream=stream, backward=True, any_frame=False)
        check_first = seek
        packets = handle.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                return
            except av.FFmpegError as exc:
                if not conceal:
                    raise VideoDecodeError(f"{name}: cannot read the file: {ffmpeg_reason(exc)}") from None
                return  # the demuxer cannot go on: the frames not delivered are concealed
            if check_first and packet.size:
                check_first = False
                if not packet.is_keyframe or packet.pts is None or packet.pts > segment.start:
                    raise _SeekMissed(f"the seek to pts {segment.start} landed on packet pts {packet.pts}")
            try:
                decoded = stream.decode(packet)
            except av.FFmpegError as exc:
                if not conceal:
                    when = f"{float(packet.pts * stream.time_base):.3f} s" if packet.pts is not None else "?"
                    raise VideoDecodeError(
                        f"{name}: decode error at {when} (pts {packet.pts}): {ffmpeg_reason(exc)}"
                    ) from None
                log.warning("%s: decode error at pts %s concealed: %s", name, packet.pts, ffmpeg_reason(exc))
                continue
            for frame in decoded:
                if frame.pts is None or frame.pts < segment.start:
                    continue
                if segment.end is not None and frame.pts >= segment.end:
                    return
                yield frame


class _Checked:
    """Frames checked against the pts the index lists: each delivered once, in order; gaps fail or are concealed."""

    def __init__(self, info: VideoInfo, expected: tuple[int, ...], conceal: bool, threads: int, name: str):
        self.info, self.expected, self.conceal, self.threads, self.name = info, expected, conceal, threads, name
        self.colour = info.assumed_colour

    def _when(self, pts: int) -> str:
        return f"{float(pts * self.info.time_base):.3f} s"

    def frames(self, decoded: Iterable[av.VideoFrame]) -> Iterator[DecodedFrame]:
        expected, info, name = self.expected, self.info, self.name
        done = 0  # frames of the segment yielded so far
        previous: np.ndarray | None = None
        for frame in decoded:
            if (frame.width, frame.height) != (info.width, info.height):
                raise VideoError(
                    f"{name}: the frame size changes from {info.width}x{info.height} to {frame.width}x{frame.height} "
                    f"at {self._when(frame.pts)}; one output stream has one size"
                )
            at = bisect.bisect_left(expected, frame.pts, lo=done)
            if at == len(expected) or expected[at] != frame.pts:
                if not self.conceal:
                    raise VideoDecodeError(
                        f"{name}: the decoder delivered a frame at {self._when(frame.pts)} (pts {frame.pts}) that the "
                        "file's index does not list"
                    )
                continue
            rgb = to_rgb(frame, self.colour, info.bit_depth, self.threads)
            if at > done:
                if not self.conceal:
                    raise VideoDecodeError(
                        f"{name}: {at - done} frame(s) from {self._when(expected[done])} could not be decoded"
                    )
                stand_in = previous if previous is not None else rgb
                for pts in expected[done:at]:
                    yield DecodedFrame(pts, stand_in, concealed=True)
            yield DecodedFrame(frame.pts, rgb)
            previous, done = rgb, at + 1
        if done < len(expected):
            if not self.conceal or previous is None:
                raise VideoDecodeError(
                    f"{name}: decoding stopped at {self._when(expected[done])}, {len(expected) - done} frame(s) short "
                    "of the segment's end"
                )
            for pts in expected[done:]:
                yield DecodedFrame(pts, previous, concealed=True)


def decode_parts(
    source: Source,
    info: VideoInfo,
    segment: Segment,
    limits: VideoLimits,
    *,
    skip: Iterable[str] = (),
    on_decode_error: str = "fail",
    threads: int = 1,
    name: str | None = None,
) -> Iterator[DecodedPart]:
    """The parts of ``segment`` as stacked frames, one at a time (memory: one part), skipping the parts whose
    :attr:`Part.key` is in ``skip`` (already encoded by an earlier run); decoding stops after the last part wanted.
    Same guarantees and errors as :func:`decode_segment`."""
    skip = set(skip)
    wanted = [part for part in segment.parts if part.key not in skip]
    if not wanted:
        return
    last = wanted[-1].pts[-1]
    frames = decode_segment(source, info, segment, limits, on_decode_error=on_decode_error, threads=threads, name=name)
    parts = iter(segment.parts)
    part = next(parts)
    batch: np.ndarray | None = None
    filled = concealed = 0
    try:
        for frame in frames:
            while frame.pts > part.pts[-1]:
                part, batch, filled, concealed = next(parts), None, 0, 0
            if part.key in skip:
                continue
            if batch is None:
                batch = np.empty((part.frames, *frame.rgb.shape), frame.rgb.dtype)  # (K, H, W, 3)
            batch[filled] = frame.rgb
            filled += 1
            concealed += frame.concealed
            if filled == part.frames:
                yield DecodedPart(part, batch, concealed)
                if frame.pts == last:
                    return
    finally:
        frames.close()
