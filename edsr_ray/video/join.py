"""Joining encoded parts into the output video without re-encoding, with the input's other streams.

The parts' video packets are copied in order; the checks make sure that is valid: every part has identical codec
parameters (extradata: parts from other encoder settings would decode wrongly), the parts' frames follow each other
without overlap, and, when given, they are exactly the frames the index lists. Decode timestamps are rebuilt for the
whole stream, because each part was encoded alone (its encoder's own dts overlap the next part's) and NUT does not
store them: with S the sorted pts and r the stream's reorder depth, packet i (decode order) gets dts S[i - r], which
is strictly increasing and never after its pts, as a single encoder would have written them.

The input's audio and subtitle packets are copied bit-exact (:mod:`edsr_ray.video.streams` converts what the output
container cannot hold); rotation, colour description, sample aspect ratio, container metadata and chapters are
kept. Packets of all streams are merged by decode time so the muxer's interleaving queue stays small. The output is
written to ``dest`` (a local temporary path the caller publishes, e.g. with ``storage.write_file``, or a file object)
and read back to check its frame count and timestamps before it is reported as done.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO

import av

from edsr_ray.video.containers import CONTAINERS, OutputFormat
from edsr_ray.video.encode import PART_FORMAT, EncodeSettings, reorder_depth
from edsr_ray.video.errors import JoinError
from edsr_ray.video.options import VideoLimits
from edsr_ray.video.probe import Source, VideoInfo, ffmpeg_reason, ffmpeg_url, open_input, source_name
from edsr_ray.video.streams import plan_streams

# Container tags that describe the writing, not the content: not copied.
_WRITER_TAGS = frozenset({"encoder", "major_brand", "minor_version", "compatible_brands"})


@dataclass(frozen=True)
class JoinResult:
    """The joined output: ``frames``, ``size`` in bytes, its container (an :data:`OUTPUTS` name) and video codec,
    ``streams`` (what it holds: "video #0 h264 1920x1080", "audio #1 aac copied", ...) and ``notes`` (what was
    re-encoded, converted or dropped, and why)."""

    frames: int
    size: int
    container: str
    codec: str
    streams: tuple[str, ...]
    notes: tuple[str, ...]


@dataclass
class _Parts:
    """What the first pass over the parts found: each part's pts (decode order, in the input's time base)."""

    pts: list[list[int]]
    depth: int
    time_base: Fraction


def join(
    parts: Sequence[Source],
    dest: str | os.PathLike | BinaryIO,
    *,
    source: Source,
    info: VideoInfo,
    settings: EncodeSettings,
    output: OutputFormat,
    limits: VideoLimits,
    expected_pts: Sequence[int] | None = None,
    name: str | None = None,
) -> JoinResult:
    """Write ``parts`` (encoded part files, in presentation order) and the other streams of ``source`` (the input,
    probed as ``info``) into ``dest`` as ``output``'s container.

    ``expected_pts``: every frame's pts (the index's); when given the parts must hold exactly these frames. A
    :class:`JoinError` names the problem (parameters differ, frames overlap, missing or extra frames, the written
    file does not read back with the expected frames); ``dest`` is then incomplete and must not be published.
    """
    name = source_name(source, name)
    if not parts:
        raise JoinError(f"{name}: no parts to join")
    scanned = _scan_parts(parts, info.time_base, name)
    every = [p for part in scanned.pts for p in sorted(part)]
    if expected_pts is not None and every != list(expected_pts):
        raise JoinError(f"{name}: the parts hold {_difference(every, list(expected_pts), info.time_base)}")
    notes: list[str] = [*info.notes, *settings.notes]
    descriptions: list[str] = []
    options = {"avoid_negative_ts": "disabled"}  # negative audio pts (AAC priming) must not shift the video's
    if output.name in ("mp4", "mov") and isinstance(dest, (str, os.PathLike)):
        options["movflags"] = "+faststart"  # the index first, so players can start before the whole file arrives
    target = ffmpeg_url(dest) if isinstance(dest, (str, os.PathLike)) else dest
    try:
        with (
            av.open(target, "w", format=output.muxer, container_options=options) as out,
            open_input(source, CONTAINERS[info.container], limits.max_pixels, name=name) as inp,
        ):
            video = _add_video(out, inp, parts[0], info, settings)
            descriptions.append(f"video #{video.index} {settings.codec} {settings.width}x{settings.height}")
            plan = plan_streams(inp, out, output, info.stream_index)
            descriptions += plan.descriptions
            notes += plan.notes
            for s in inp.streams:
                if s.index not in plan.handlers:
                    s.discard = av.stream.Discard.all
            _copy_container_tags(inp, out)
            out.start_encoding()
            others = _other_packets(inp, plan.handlers)
            for packet in heapq.merge(_video_packets(parts, video, scanned, every), others, key=_decode_time):
                out.mux(packet)
            for handler in plan.handlers.values():
                for packet in handler.flush():
                    out.mux(packet)
    except av.FFmpegError as exc:
        raise JoinError(f"{name}: writing {output.description} failed: {ffmpeg_reason(exc)}") from None
    _check_output(dest, output, every, info.time_base, name)
    size = os.path.getsize(dest) if isinstance(dest, (str, os.PathLike)) else dest.tell()
    return JoinResult(len(every), size, output.name, settings.codec, tuple(descriptions), tuple(notes))


@contextlib.contextmanager
def _open_part(part: Source) -> Iterator[av.container.InputContainer]:
    if not isinstance(part, (str, os.PathLike)):
        part.seek(0)
    with av.open(ffmpeg_url(part) if isinstance(part, (str, os.PathLike)) else part, format=PART_FORMAT) as handle:
        yield handle


def _scan_parts(parts: Sequence[Source], time_base: Fraction, name: str) -> _Parts:
    """First pass: the parts' codec parameters must match and their frames must follow each other."""
    found: list[list[int]] = []
    extradata = None
    for number, part in enumerate(parts):
        with _open_part(part) as handle:
            stream = handle.streams.video[0]
            data = bytes(stream.codec_context.extradata or b"")
            if extradata is None:
                extradata = data
            elif data != extradata:
                raise JoinError(
                    f"{name}: part {number} was encoded with other codec parameters than part 0 (encoder settings "
                    "differ); the parts cannot be joined"
                )
            pts = [_rescale(p.pts, stream.time_base, time_base, name) for p in handle.demux(stream) if p.size]
        if not pts:
            raise JoinError(f"{name}: part {number} holds no frames")
        if found and min(pts) <= max(found[-1]):
            raise JoinError(f"{name}: part {number} overlaps or precedes part {number - 1} (pts {min(pts)})")
        found.append(pts)
    return _Parts(found, max(reorder_depth(p) for p in found), time_base)


def _rescale(pts: int | None, part_base: Fraction, time_base: Fraction, name: str) -> int:
    """A part's pts in the input's time base; NUT stores the input's time base or a finer multiple, so it is exact."""
    if pts is None:
        raise JoinError(f"{name}: a part has a packet without a timestamp")
    value = pts * part_base / time_base
    if value.denominator != 1:
        raise JoinError(f"{name}: a part's time base {part_base} does not hold the input's ({time_base}) exactly")
    return int(value)


def _difference(got: list[int], want: list[int], time_base: Fraction) -> str:
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    what = []
    if missing:
        what.append(f"{len(missing)} frame(s) fewer than the input, first at {float(missing[0] * time_base):.3f} s")
    if extra:
        what.append(f"{len(extra)} frame(s) the input does not have, first at {float(extra[0] * time_base):.3f} s")
    return "; ".join(what) or f"{len(got)} frames for the input's {len(want)}"


def _add_video(
    out: av.container.OutputContainer,
    inp: av.container.InputContainer,
    first_part: Source,
    info: VideoInfo,
    settings: EncodeSettings,
) -> av.VideoStream:
    with _open_part(first_part) as handle:
        # opaque=True copies the part's own codec; without it PyAV looks up an encoder named like the decoder,
        # and AV1's decoder (libdav1d) has no encoder of that name.
        video = out.add_stream_from_template(handle.streams.video[0], opaque=True)
    video.time_base = info.time_base  # a wish: Matroska and WebM store 1/1000, MPEG-TS 1/90000
    # Codecs without colour signalling in their bitstream (FFV1, and VP9 for primaries and transfer) rely on the
    # container's colour fields, which come from the stream parameters.
    settings.colour.tag(video.codec_context)
    if info.sample_aspect_ratio:
        video.codec_context.sample_aspect_ratio = info.sample_aspect_ratio
    if info.display_matrix:
        video.set_display_matrix(list(info.display_matrix))
    source = inp.streams[info.stream_index]
    for key in ("language", "title", "handler_name"):
        if source.metadata.get(key):
            video.metadata[key] = source.metadata[key]
    return video


def _copy_container_tags(inp: av.container.InputContainer, out: av.container.OutputContainer) -> None:
    for key, value in inp.metadata.items():
        if key.lower() not in _WRITER_TAGS:
            out.metadata[key] = value
    chapters = inp.chapters()
    if chapters:
        out.set_chapters(chapters)


def _video_packets(
    parts: Sequence[Source], video: av.VideoStream, scanned: _Parts, every: list[int]
) -> Iterator[av.Packet]:
    """The parts' packets in order, with pts in the input's time base and dts rebuilt for the whole stream."""
    depth, time_base = scanned.depth, scanned.time_base
    step = every[1] - every[0] if len(every) > 1 else 1
    following = dict(itertools.pairwise(every))
    index = 0
    for number, part in enumerate(parts):
        with _open_part(part) as handle:
            stream = handle.streams.video[0]
            for packet, pts in zip((p for p in handle.demux(stream) if p.size), scanned.pts[number]):
                packet.pts = pts
                packet.dts = every[index - depth] if index >= depth else every[0] - (depth - index) * step
                packet.duration = following.get(pts, pts + step) - pts
                packet.time_base = time_base
                packet.stream = video
                index += 1
                yield packet


def _other_packets(inp: av.container.InputContainer, handlers: dict) -> Iterator[av.Packet]:
    if not handlers:
        return
    for packet in inp.demux([inp.streams[i] for i in handlers]):
        yield from handlers[packet.stream.index].packets(packet)


def _decode_time(packet: av.Packet) -> float:
    t = packet.dts if packet.dts is not None else packet.pts
    return float(t * packet.time_base) if t is not None and packet.time_base else 0.0


def _check_output(dest, output: OutputFormat, every: list[int], time_base: Fraction, name: str) -> None:
    """Read the written file's video packets back: as many frames as joined, at the same times (exactly, or rounded
    to the output's time base where it is coarser: Matroska stores milliseconds)."""
    if not isinstance(dest, (str, os.PathLike)):
        dest.seek(0)
    try:
        reader = CONTAINERS[output.name].demuxer
        with av.open(ffmpeg_url(dest) if isinstance(dest, (str, os.PathLike)) else dest, format=reader) as handle:
            stream = handle.streams.video[0]
            tick = stream.time_base
            got = sorted(p.pts for p in handle.demux(stream) if p.size and p.pts is not None)
    except av.FFmpegError as exc:
        reason = ffmpeg_reason(exc)
        raise JoinError(f"{name}: the joined {output.description} file does not read back: {reason}") from None
    finally:
        if not isinstance(dest, (str, os.PathLike)):
            dest.seek(0, os.SEEK_END)
    if len(got) != len(every):
        raise JoinError(f"{name}: the joined file reads back with {len(got)} frames, not {len(every)}")
    for written, wanted in zip(got, every):
        if abs(written * tick - wanted * time_base) > (0 if tick == time_base else tick / 2):
            raise JoinError(
                f"{name}: the joined file has a frame at {float(written * tick):.6f} s where the input has one at "
                f"{float(wanted * time_base):.6f} s"
            )
