"""What the video codecs cost per frame on one core: encoding 1080p and 4K outputs per codec and preset, decoding,
and the colour conversions between video frames and the model's RGB, side by side in one run; then the batch job's
frames/s on a video against its images/s on the same frames as PNGs.

    python benchmarks/bench_video.py [--frames 24] [--sizes 1080p,4K] [--quick] [--no-write]
        [--job-frames 96] [--job-size 320x180] [--job-only | --no-job] [--gpus N]

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

The job comparison (target: the video job at >= 0.9x the image job's rate): one H.264 video of ``--job-frames`` frames
(``--job-size``, CRF 18, keyframe every second) and the same frames decoded and stored as PNGs, each upscaled x2 by
:func:`edsr_ray.batch.job.run_upscale` on Ray Data with the job's defaults (video: H.264 ``medium`` CRF 18; images:
PNG with fpng), alternately, twice each, the best run of each counted. The model is a small random-weight EDSR x2
(4 blocks, 32 features): enough compute that the model stage matters, small enough for CPUs; on a GPU node pass
``--gpus 1`` and a larger ``--job-size``.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import resource
import tempfile
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

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


def job_comparison(frames: int, size: str, gpus: int | None) -> tuple[list[str], float]:
    """Rows of the video-job vs image-job table, and the ratio of the best rates (video frames/s / images/s)."""
    import ray
    import torch

    from edsr_ray.batch.job import ComputeOptions, run_upscale
    from edsr_ray.codecs import encode_image
    from edsr_ray.models import EDSR
    from edsr_ray.video.samples import SampleVideo, write_video
    from edsr_ray.weights import save_model

    width, height = (int(x) for x in size.split("x"))
    with tempfile.TemporaryDirectory(prefix="bench-video-") as tmp:
        root = Path(tmp)
        (root / "video").mkdir()
        (root / "png").mkdir()
        video = root / "video" / "clip.mp4"
        write_video(str(video), SampleVideo(frames=frames, width=width, height=height, options={"g": "24"}))
        with av.open(str(video)) as handle:
            for i, frame in enumerate(handle.decode(video=0)):
                (root / "png" / f"{i:05d}.png").write_bytes(encode_image(frame.to_ndarray(format="rgb24"), "png"))
        torch.manual_seed(0)
        model = str(save_model(EDSR(4, 32, 2), root / "edsr_x2.pt"))
        compute = ComputeOptions(gpus=gpus)
        best = {"video": 0.0, "images": 0.0}
        seconds = {"video": [], "images": []}
        for round_ in range(2):
            for kind in ("images", "video"):
                out = root / f"out-{kind}-{round_}"
                start = time.perf_counter()
                summary = run_upscale(
                    model,
                    str(root / ("png" if kind == "images" else "video")),
                    str(out),
                    compute=compute,
                    progress=False,
                )
                wall = time.perf_counter() - start
                done = summary.frames if kind == "video" else summary.written
                if done != frames:
                    raise SystemExit(f"the {kind} job upscaled {done} of {frames} frames: {summary.failures}")
                rate = done / summary.seconds
                seconds[kind].append(f"{summary.seconds:.1f}")
                best[kind] = max(best[kind], rate)
                print(
                    f"{kind} job, round {round_ + 1}: {rate:.2f} frames/s ({summary.seconds:.1f} s, {wall:.1f} s "
                    "with setup)",
                    flush=True,
                )
        resources = ray.cluster_resources()
        ray.shutdown()
    ratio = best["video"] / best["images"]
    where = f"{int(resources.get('GPU', 0))} GPU(s), {int(resources.get('CPU', 0))} CPUs"
    rows = [
        f"| {width}x{height} -> {2 * width}x{2 * height} | {frames} | {where} | {best['images']:.2f} "
        f"({', '.join(seconds['images'])} s) | {best['video']:.2f} ({', '.join(seconds['video'])} s) | {ratio:.2f} |"
    ]
    return rows, ratio


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=24, help="frames per encoded part (default 24: 1 s at 24 fps)")
    p.add_argument("--sizes", default="1080p,4K", help="output sizes, of 1080p and 4K (default both)")
    p.add_argument("--quick", action="store_true", help="one preset per codec")
    p.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    p.add_argument("--job-frames", type=int, default=96, help="frames of the job comparison's video (default 96)")
    p.add_argument("--job-size", default="320x180", help="input frame size of the job comparison (default 320x180)")
    p.add_argument("--gpus", type=int, help="model actors' GPUs in the job comparison (default: all; 0: CPU)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--job-only", action="store_true", help="only the job comparison")
    which.add_argument("--no-job", action="store_true", help="only the codec costs")
    args = p.parse_args()
    sizes = [s for s in args.sizes.split(",") if s]
    unknown = set(sizes) - set(SIZES)
    if unknown:
        p.error(f"unknown sizes {sorted(unknown)}; choose from {list(SIZES)}")

    quiet_encoders()
    machine_line = f"{machine('cuda' if args.gpus else 'cpu')}; load average at start {load_average()}"
    print(machine_line, flush=True)
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [
        f"## bench_video.py — {now}",
        "",
        f"Machine: {machine_line}; PyAV {av.__version__} "
        f"(libavcodec {'.'.join(map(str, av.library_versions['libavcodec']))}).",
        "",
    ]
    if not args.job_only:
        lines += codec_section(args, sizes)
    if not args.no_job:
        # The jobs use every core (Ray), so they run after the pinned codec measurements, unpinned.
        rows, ratio = job_comparison(args.job_frames, args.job_size, args.gpus)
        lines += [
            "Video job vs image job on the same frames (`run_upscale` on Ray Data, defaults of each: H.264 medium CRF "
            "18 vs PNG/fpng; small random-weight EDSR x2; best of two alternating runs, the runs' processing seconds "
            "in brackets; target >= 0.9x):",
            "",
            "| input -> output | frames | cluster | image job frames/s | video job frames/s | video / image |",
            "|---|---:|---|---:|---:|---:|",
            *rows,
            "",
            f"Ratio {ratio:.2f}: {'meets' if ratio >= 0.9 else 'misses'} the 0.9x target on this machine."
            + (
                ""
                if args.gpus
                else " On CPUs the forward passes are the same for both and the video job's frames travel as a few "
                "part rows, with less Ray Data work per frame than one row per image; the comparison that matters, "
                "where codecs may bound a GPU's rate, is `--gpus 1` on a GPU node (`benchmarks/gpu_check.sh`)."
            ),
        ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        append_results(text)


def codec_section(args: argparse.Namespace, sizes: list[str]) -> list[str]:
    """The codec-cost tables, measured pinned to one core."""
    core = min(os.sched_getaffinity(0))
    everything = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})  # one core: codec threads cannot spread
    try:
        conversion_rows, codec_rows = codec_costs(sizes, args.frames, QUICK_ENCODERS if args.quick else ENCODERS)
    finally:
        os.sched_setaffinity(0, everything)
    return [
        f"Pinned to CPU {core}, every codec with one thread.  ",
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
    ]


if __name__ == "__main__":
    main()
