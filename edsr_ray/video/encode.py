"""Encoding one part: upscaled RGB frames with their original timestamps -> a small file holding one closed GOP.

Encoders keep state across frames, and a pipeline cannot send every frame of a video to one encoder, so each part is
encoded by a fresh encoder: its first frame is a keyframe and it references nothing outside the part; the parts are
then joined without re-encoding (:mod:`edsr_ray.video.join`). Part files are NUT, which holds any codec and exact
timestamps, written with ``avoid_negative_ts=disabled`` (otherwise every timestamp is shifted by the encoder's
negative first decode time). Every frame keeps the input's pts in the input's time base, which is how variable frame
rates, a first pts other than 0 and the time base itself survive. Encoders also need the frame rate (rate control and
the bitstream's timing info read it, not the time base).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO

import av
import numpy as np

from edsr_ray.video.errors import VideoError
from edsr_ray.video.frames import MATRIX_BT709, MATRIX_RGB, RANGE_FULL, RANGE_LIMITED, Colour, from_rgb, is_rgb_format
from edsr_ray.video.options import CODECS, VideoOptions
from edsr_ray.video.probe import VideoInfo, ffmpeg_url

PART_FORMAT = "nut"
PART_EXTENSION = ".nut"
# The keyframe interval asked of every encoder: longer than any part, so the fresh encoder's first frame is the only
# keyframe it must make (it may add others at scene cuts).
_NO_FORCED_KEYFRAMES = str(10**6)
_CHROMA = {(2, 2): "420", (2, 1): "422", (1, 1): "444"}


@dataclass(frozen=True)
class EncodeSettings:
    """Everything that decides the bits of an encoded part, shared by all parts of one video (so their codec
    parameters are identical and they join). Built by :func:`encode_settings`.

    ``width``/``height`` are the upscaled frame size; ``bit_depth`` 8 means uint8 arrays, 16 uint16; ``pix_fmt`` is
    what the encoder stores; ``colour`` both converts the RGB frames and tags the output; ``notes`` say what of the
    input could not be kept (bit depth, chroma resolution) for the manifest.
    """

    codec: str
    pix_fmt: str
    width: int
    height: int
    bit_depth: int
    time_base: Fraction
    frame_rate: Fraction
    colour: Colour
    crf: int | None = None
    preset: str | None = None
    notes: tuple[str, ...] = ()


def encode_settings(info: VideoInfo, options: VideoOptions, scale: int) -> EncodeSettings:
    """The settings for encoding ``info``'s video upscaled by ``scale`` with ``options``: the input's chroma
    resolution and bit depth where the encoder takes them (else the nearest it takes, with a note), ffv1 as RGB,
    the input's time base and frame rate, its colour description (what was assumed where it says nothing)."""
    codec = CODECS[options.codec]
    notes: list[str] = []
    if codec.rgb:
        pix_fmt = "bgr0" if info.bit_depth <= 8 else "gbrp16le"
        colour = Colour(info.colour.primaries, info.colour.transfer, MATRIX_RGB, RANGE_FULL)
    else:
        pix_fmt = _yuv_format(codec.name, codec.encoder, codec.max_bit_depth, info, notes)
        colour = info.assumed_colour
        if colour.matrix == MATRIX_RGB:  # an RGB source written as YUV
            colour = Colour(colour.primaries, colour.transfer, MATRIX_BT709, RANGE_LIMITED)
    return EncodeSettings(
        codec=codec.name,
        pix_fmt=pix_fmt,
        width=info.width * scale,
        height=info.height * scale,
        bit_depth=8 if info.bit_depth <= 8 else 16,
        time_base=info.time_base,
        frame_rate=info.frame_rate or Fraction(30),
        colour=colour,
        crf=options.effective_crf,
        preset=options.effective_preset,
        notes=tuple(notes),
    )


def _yuv_format(name: str, encoder: str, max_depth: int, info: VideoInfo, notes: list[str]) -> str:
    """The input's chroma subsampling and depth in a pixel format ``encoder`` takes, or the nearest one."""
    source = av.VideoFormat(info.pix_fmt)
    if is_rgb_format(info.pix_fmt):
        chroma = "444"
    elif len(source.components) == 1:
        chroma = "gray"
    else:
        step = (64 // max(source.chroma_width(64), 1), 64 // max(source.chroma_height(64), 1))
        chroma = _CHROMA.get(step, "420")
    depth = 8 if info.bit_depth <= 8 else 10 if info.bit_depth <= 10 else 12
    taken = {f.name for f in av.Codec(encoder, "w").video_formats or ()}
    wanted = [(chroma, depth), (chroma, min(depth, 10)), ("420", depth), ("420", min(depth, 10)), ("420", 8)]
    for chroma_out, depth_out in wanted:
        fmt = _pix_fmt(chroma_out, min(depth_out, max_depth))
        if fmt in taken:
            if min(depth_out, max_depth) < depth:
                notes.append(
                    f"{depth}-bit video written as {min(depth_out, max_depth)}-bit: the {name} encoder here "
                    f"takes no more"
                )
            if chroma_out != chroma and chroma != "gray":
                notes.append(f"4:{chroma[1]}:{chroma[2]} chroma written as 4:2:0: the {name} encoder takes no other")
            return fmt
    raise VideoError(f"the {name} encoder takes none of the pixel formats tried for {info.pix_fmt} input")


def _pix_fmt(chroma: str, depth: int) -> str:
    base = "gray" if chroma == "gray" else f"yuv{chroma}p"
    return base if depth == 8 else f"{base}{depth}le"


def encoder_options(settings: EncodeSettings, threads: int = 1) -> dict[str, str]:
    """The FFmpeg options of ``settings``' encoder, using ``threads`` threads (one, by default: a pipeline runs
    one encoder per core), with no keyframes forced after the first and the encoders' own logging quiet."""
    crf, preset, n = str(settings.crf), settings.preset, str(threads)
    options = {"g": _NO_FORCED_KEYFRAMES}
    if settings.codec == "h264":
        options |= {"crf": crf, "preset": preset, "threads": n}
    elif settings.codec == "h265":
        x265 = f"log-level=error:pools={threads}:frame-threads={min(threads, 4)}"
        options |= {"crf": crf, "preset": preset, "x265-params": x265}
    elif settings.codec == "vp9":
        speed = int(preset)
        options |= {
            "crf": crf,
            "b": "0",  # constant quality: no bit-rate target
            "deadline": "good" if speed <= 5 else "realtime",
            "cpu-used": preset,
            "threads": n,
            "row-mt": "1" if threads > 1 else "0",
        }
    elif settings.codec == "av1":
        options |= {"crf": crf, "preset": preset, "svtav1-params": f"lp={threads}"}
    else:  # ffv1: version 3, every frame intra, slices checked by CRC
        options |= {"g": "1", "level": "3", "slices": "4", "slicecrc": "1", "threads": n}
    return options


@dataclass(frozen=True)
class EncodedPart:
    """What :func:`encode_part` wrote: ``frames`` packets (one per frame), ``size`` bytes, and the reorder depth of
    its packets (how far decode order runs ahead of presentation order: 0 without B-frames)."""

    frames: int
    size: int
    reorder_depth: int


def encode_part(
    dest: str | os.PathLike | BinaryIO,
    frames: np.ndarray | Sequence[np.ndarray],
    pts: Sequence[int],
    settings: EncodeSettings,
    *,
    threads: int = 1,
) -> EncodedPart:
    """Encode upscaled frames ((K, H, W, 3) uint8/uint16 RGB, or a sequence of (H, W, 3)), frame i at ``pts[i]``
    (in ``settings.time_base``, increasing), into a NUT file at ``dest`` (a path or a writable binary file object).

    Guarantees, checked: the first packet is a keyframe, one packet per frame, and the packets carry exactly the
    given pts. The frames are converted to ``settings.pix_fmt`` with ``settings.colour`` here, explicitly.
    """
    if len(frames) != len(pts) or not len(pts):
        raise ValueError(f"encode_part needs one pts per frame, at least one: {len(frames)} frames, {len(pts)} pts")
    if any(b <= a for a, b in itertools.pairwise(pts)):
        raise ValueError("encode_part needs increasing pts")
    dtype = np.uint8 if settings.bit_depth == 8 else np.uint16
    shape = (settings.height, settings.width, 3)
    for frame in frames:
        if frame.shape != shape or frame.dtype != dtype:
            want = f"{shape} {np.dtype(dtype).name}"
            raise ValueError(f"encode_part expects {want} frames, not {frame.shape} {frame.dtype}")
    order: list[tuple[int, bool]] = []  # (pts, keyframe) of each packet, in decode order
    quiet_encoders()
    target = ffmpeg_url(dest) if isinstance(dest, (str, os.PathLike)) else dest
    with av.open(target, "w", format=PART_FORMAT, container_options={"avoid_negative_ts": "disabled"}) as out:
        codec = CODECS[settings.codec]
        stream = out.add_stream(codec.encoder, rate=settings.frame_rate, options=encoder_options(settings, threads))
        stream.width, stream.height, stream.pix_fmt = settings.width, settings.height, settings.pix_fmt
        stream.time_base = settings.time_base
        ctx = stream.codec_context
        ctx.time_base = settings.time_base
        ctx.framerate = settings.frame_rate
        ctx.thread_count = threads
        settings.colour.tag(ctx)
        for rgb, p in zip(frames, pts):
            frame = from_rgb(np.ascontiguousarray(rgb), settings.pix_fmt, settings.colour, threads)
            frame.pts, frame.time_base = int(p), settings.time_base
            for packet in stream.encode(frame):
                order.append((packet.pts, packet.is_keyframe))
                out.mux(packet)
        for packet in stream.encode(None):
            order.append((packet.pts, packet.is_keyframe))
            out.mux(packet)
    written = [p for p, _ in order]
    if not order[0][1] or sorted(written) != [int(p) for p in pts]:
        raise VideoError(
            f"the {codec.encoder} encoder wrote {len(order)} packets for {len(pts)} frames"
            + ("" if order[0][1] else ", the first not a keyframe")
        )
    size = dest.tell() if hasattr(dest, "tell") else os.path.getsize(dest)
    return EncodedPart(len(order), size, reorder_depth(written))


def quiet_encoders() -> None:
    """SVT-AV1 prints its whole configuration to stderr for every encoder it opens unless ``SVT_LOG`` says errors
    only (1); a value already set in the environment is kept."""
    os.environ.setdefault("SVT_LOG", "1")


def reorder_depth(pts_in_decode_order: Sequence[int]) -> int:
    """How many packets decoding runs ahead of presentation: max over packets of (decode index - presentation rank).
    0 when packets come in presentation order (no B-frames)."""
    rank = {p: r for r, p in enumerate(sorted(pts_in_decode_order))}
    return max((i - rank[p] for i, p in enumerate(pts_in_decode_order)), default=0)
