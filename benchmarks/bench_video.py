"""What the video codecs cost per frame on one core: encoding 1080p and 4K outputs per codec and preset, decoding,
and the colour conversions between video frames and the model's RGB, side by side in one run.

    python benchmarks/bench_video.py [--frames 24] [--sizes 1080p,4K] [--quick] [--no-write]

The process is pinned to one CPU and every codec runs with one thread (as the video pipeline runs one encoder per
core), and CPU time is reported: on a shared machine wall time also counts other people's work, CPU time is what a
dedicated core would spend. Everything goes through :mod:`edsr_ray.video`, the code the video pipeline runs:

* conversions: :func:`~edsr_ray.video.frames.from_rgb` (RGB -> YUV 4:2:0, 8 and 10 bit, and RGB -> bgr0, FFV1's
  lossless layout) and :func:`~edsr_ray.video.frames.to_rgb` (back);
* encoding: :func:`~edsr_ray.video.encode_part` of one part of ``--frames`` frames, a fresh encoder as in the
  pipeline (opening and flushing it included), the RGB -> YUV conversion included; size per frame;
* decoding what was encoded, with and without the conversion to RGB, and decoding the input a x2 job reads
  (half the output size, H.264 CRF 18): the other codec work per output frame.

Two kinds of content, at the output size: "photo", moving crops of a bundled photo enlarged bicubically (smooth,
like a super-resolution model's output: the easy end for an encoder) and "grain", the same with Gaussian noise of
sigma 3 added to every frame (film grain or sensor noise: the hard end; real footage lies in between). "Cores per
100 fps" is what 100 output frames per second cost in codec work: input decode + conversions + encode. A section is
appended to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import resource
from collections.abc import Callable
from fractions import Fraction

import av
import numpy as np
from _machine import append_results, load_average, machine  # what every benchmark here records
from PIL import Image

from edsr_ray.video import Colour, VideoOptions, encode_part
from edsr_ray.video.encode import EncodeSettings, quiet_encoders
from edsr_ray.video.frames import from_rgb, to_rgb
from edsr_ray.video.samples import moving_crops

SIZES = {"1080p": (1920, 1080), "4K": (3840, 2160)}
BT709 = Colour(1, 1, 1, 1)
TIME_BASE = Fraction(1, 24)
# (codec, preset) pairs measured: each codec's default and a faster one; ffv1 has no preset.
ENCODERS = (
    ("h264", "veryfast"),
    ("h264", "medium"),
    ("h265", "fast"),
    ("h265", "medium"),
    ("vp9", "4"),
    ("vp9", "8"),
    ("av1", "8"),
    ("av1", "10"),
    ("ffv1", None),
)
QUICK_ENCODERS = (("h264", "medium"), ("h265", "fast"), ("vp9", "8"), ("av1", "10"), ("ffv1", None))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def per_frame_ms(work: Callable[[], object], frames: int) -> float:
    start = cpu_seconds()
    work()
    return 1e3 * (cpu_seconds() - start) / frames


def content(kind: str, n: int, width: int, height: int) -> list[np.ndarray]:
    """``n`` RGB frames at the output size: photo crops of a quarter of the width enlarged, grain optionally added."""
    small = moving_crops(n, width // 4, height // 4)
    frames = [np.asarray(Image.fromarray(a).resize((width, height), Image.Resampling.BICUBIC)) for a in small]
    if kind == "grain":
        rng = np.random.default_rng(0)
        frames = [np.clip(f + rng.normal(0, 3, f.shape), 0, 255).astype(np.uint8) for f in frames]
    return frames


def settings_for(codec: str, preset: str | None, width: int, height: int, ten_bit: bool = False) -> EncodeSettings:
    options = VideoOptions(codec=codec, preset=preset)
    rgb = codec == "ffv1"
    return EncodeSettings(
        codec=codec,
        pix_fmt=("bgr0" if not ten_bit else "gbrp16le") if rgb else ("yuv420p10le" if ten_bit else "yuv420p"),
        width=width,
        height=height,
        bit_depth=16 if ten_bit else 8,
        time_base=TIME_BASE,
        frame_rate=Fraction(24),
        colour=Colour(1, 1, 0, 2) if rgb else BT709,
        crf=options.effective_crf,
        preset=options.effective_preset,
    )


def decode_ms(data: bytes, frames: int, *, rgb: bool, bit_depth: int = 8) -> float:
    """CPU ms per frame to decode an encoded part with one thread, and convert to RGB when ``rgb``."""

    def work() -> None:
        with av.open(io.BytesIO(data), format="nut") as handle:
            stream = handle.streams.video[0]
            stream.codec_context.thread_count = 1
            stream.thread_type = "NONE"
            for frame in handle.decode(stream):
                if rgb:
                    to_rgb(frame, BT709, bit_depth, threads=1)

    return per_frame_ms(work, frames)


def conversions(frames: list[np.ndarray]) -> dict[str, float]:
    n = len(frames)
    deep = [f.astype(np.uint16) * 257 for f in frames]
    yuv = [from_rgb(f, "yuv420p", BT709) for f in frames]
    yuv10 = [from_rgb(f, "yuv420p10le", BT709) for f in deep]
    return {
        "rgb24 -> yuv420p": per_frame_ms(lambda: [from_rgb(f, "yuv420p", BT709) for f in frames], n),
        "yuv420p -> rgb24": per_frame_ms(lambda: [to_rgb(f, BT709, 8) for f in yuv], n),
        "rgb48 -> yuv420p10": per_frame_ms(lambda: [from_rgb(f, "yuv420p10le", BT709) for f in deep], n),
        "yuv420p10 -> rgb48": per_frame_ms(lambda: [to_rgb(f, BT709, 16) for f in yuv10], n),
        "rgb24 -> bgr0": per_frame_ms(lambda: [from_rgb(f, "bgr0", Colour(1, 1, 0, 2)) for f in frames], n),
    }


def encode(frames: list[np.ndarray], settings: EncodeSettings) -> tuple[float, float, bytes]:
    """(CPU ms per frame, KB per frame, the part) of encoding ``frames`` as one part."""
    pts = list(range(len(frames)))
    part = io.BytesIO()
    ms = per_frame_ms(lambda: encode_part(part, np.stack(frames), pts, settings, threads=1), len(frames))
    return ms, part.tell() / 1e3 / len(frames), part.getvalue()


def codec_costs(sizes: list[str], n: int, encoders: tuple) -> tuple[list[str], list[str]]:
    """The conversion table and the encode/decode table, as markdown rows."""
    conversion_rows, codec_rows = [], []
    for label in sizes:
        width, height = SIZES[label]
        for kind in ("photo", "grain"):
            frames = content(kind, n, width, height)
            if kind == "photo":
                costs = conversions(frames)
                conversion_rows.append(f"| {label} | " + " | ".join(f"{ms:.1f}" for ms in costs.values()) + " |")
                print(label, costs, flush=True)
            # The input of a x2 job: half the size, H.264 CRF 18, decoded and converted for the model.
            small = [np.asarray(Image.fromarray(f).resize((width // 2, height // 2))) for f in frames]
            _, _, source = encode(small, settings_for("h264", "medium", width // 2, height // 2))
            input_ms = decode_ms(source, n, rgb=True)
            for codec, preset in [*encoders, ("h264 10-bit", "medium")]:
                ten_bit = codec.endswith("10-bit")
                name = codec.split()[0]
                settings = settings_for(name, preset, width, height, ten_bit)
                data = [f.astype(np.uint16) * 257 for f in frames] if ten_bit else frames
                ms, kb, part = encode(data, settings)
                plain = decode_ms(part, n, rgb=False)
                with_rgb = decode_ms(part, n, rgb=True, bit_depth=16 if ten_bit else 8)
                cores = 100 * (input_ms + ms) / 1e3
                crf = "-" if settings.crf is None else settings.crf
                row = (
                    f"| {label} | {kind} | {codec} | {preset or '-'} | {crf}"
                    f" | {ms:.1f} | {1e3 / ms:.1f} | {kb:.1f} | {plain:.1f} | {with_rgb:.1f} | {input_ms:.1f}"
                    f" | {cores:.1f} |"
                )
                codec_rows.append(row)
                print(row, flush=True)
    return conversion_rows, codec_rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=24, help="frames per encoded part (default 24: 1 s at 24 fps)")
    p.add_argument("--sizes", default="1080p,4K", help="output sizes, of 1080p and 4K (default both)")
    p.add_argument("--quick", action="store_true", help="one preset per codec")
    p.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = p.parse_args()
    sizes = [s for s in args.sizes.split(",") if s]
    unknown = set(sizes) - set(SIZES)
    if unknown:
        p.error(f"unknown sizes {sorted(unknown)}; choose from {list(SIZES)}")

    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})  # one core: codec threads cannot spread
    quiet_encoders()
    machine_line = f"{machine()}; load average at start {load_average()}"
    print(machine_line, flush=True)
    conversion_rows, codec_rows = codec_costs(sizes, args.frames, QUICK_ENCODERS if args.quick else ENCODERS)

    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [
        f"## bench_video.py — {now}",
        "",
        f"Machine: {machine_line}; pinned to CPU {core}, every codec with one thread; PyAV {av.__version__} "
        f"(libavcodec {'.'.join(map(str, av.library_versions['libavcodec']))}).  ",
        f"CPU milliseconds per frame (the work of one dedicated core), parts of {args.frames} frames encoded by a "
        "fresh encoder each (opening and flushing included), BT.709.",
        "",
        "Conversions between video frames and the model's RGB, photo content:",
        "",
        "| output | rgb24 -> yuv420p | yuv420p -> rgb24 | rgb48 -> yuv420p10 | yuv420p10 -> rgb48 | rgb24 -> bgr0 |",
        "|---|---:|---:|---:|---:|---:|",
        *conversion_rows,
        "",
        "Encoding the upscaled frames (RGB -> YUV conversion included) and decoding them (alone, and with the "
        "conversion to RGB); the input a x2 job decodes (half the size, H.264) with its conversion; cores per 100 "
        "output frames/s = 0.1 x (input decode + encode) ms:",
        "",
        "| output | content | codec | preset | CRF | encode ms | fps/core | KB/frame | decode ms | decode+RGB ms "
        "| input decode+RGB ms | cores per 100 fps |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *codec_rows,
        "",
        "Video job vs image job on the same frames (target >= 0.9x in one run): not measured here yet; it is this "
        "script's second section, added with the batch job's video stages.",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        append_results(text)


if __name__ == "__main__":
    main()
