"""Images per second of the upscale job end to end, next to the model alone and the codecs alone, in one run.

    python benchmarks/bench_upscale.py [--images 32] [--baseline-images 6] [--no-baseline] [--no-write]

Starts the embedded S3 server and a local Ray, writes photos of 270x480 (the bundled real photos, downscaled and
cropped) to it as PNG, and measures on this machine:

* codecs on one core, per image: decoding a 270x480 PNG with libspng (pyspng, what the job uses) and with Pillow;
  encoding the 1080x1920 output with fpng (the job's default), with Pillow's default zlib level 6 (the job's
  ``--png-compression small``), as JPEG q95 and as WebP q90;
* the codec-only rate: decode + encode of every image in a process pool as wide as the CPUs the job leaves to its
  codec tasks;
* the model-only rate: the job's model stage (:class:`~edsr_ray.batch.stages.UpscaleBatch`) on decoded images in Ray
  actors configured exactly like the job's (one per GPU, or CPU actors with or without the glibc settings of
  :data:`edsr_ray.batch.CPU_ACTOR_ENV`);
* the job: :func:`edsr_ray.batch.job.run_upscale` from S3 to S3 on Ray Data, on N and on 2N images; "end to end" is
  2N / T(2N), actor start included; "steady" is N / (T(2N) - T(N)), where the fixed costs (starting the actors,
  filling and draining the pipeline) cancel out: the rate a long run settles at.

Two models, both doing the full compute of their architecture: a tiny EDSR x4 (4 blocks, 16 features), where the
codecs are the limit, in PNG (fast and small) and JPEG; and the EDSR baseline x4, the model that matters on GPUs (on a
CPU it is the limit), in PNG with and without the glibc settings. Their weights make them exact bilinear upscalers
(the body computes with random weights but its last conv is zero), so the outputs look like photos and the encoders
see realistic content; random weights would give noise, which encodes at a very different cost. A section is
appended to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from _machine import append_results, load_average, machine  # what every benchmark here records
from PIL import Image
from torch import nn

from edsr_ray.batch import job as batch  # the driver: run_upscale, its compute options and plans
from edsr_ray.batch.stages import CodecOptions, encode_output
from edsr_ray.codecs import DecodedImage, check_encoded_size, decode_image
from edsr_ray.models import EDSR, edsr_baseline
from edsr_ray.weights import save_model

LR_SHAPE = (270, 480)
SCALE = 4
BUCKET = "bench"
# The job's output choices measured: (label, format, PNG compression).
FORMATS = (("PNG fpng", "png", "fast"), ("PNG zlib 6", "png", "small"), ("JPEG q95", "jpeg", "fast"))
CHECK_LABEL = "post-encode size check of a 1080x1920 PNG (header read back)"


# --------------------------------------------------------------------------------------------------------------------
# Inputs and models


def make_inputs(count: int) -> list[bytes]:
    """``count`` PNGs of 270x480: the bundled photos downscaled (three zooms) and cropped at shifting offsets."""
    from edsr_ray.samples import photos

    pictures = list(photos().values())
    h, w = LR_SHAPE
    out = []
    for i in range(count):
        img = Image.fromarray(pictures[i % len(pictures)])
        zoom = max(h / img.height, w / img.width) * (1.0 + 0.25 * (i // len(pictures) % 3))
        size = (max(w, round(img.width * zoom)), max(h, round(img.height * zoom)))
        small = np.asarray(img.resize(size, Image.Resampling.LANCZOS))
        top, left = (7 * i) % (small.shape[0] - h + 1), (13 * i) % (small.shape[1] - w + 1)
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(small[top : top + h, left : left + w])).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def bilinear_weights(model: EDSR) -> EDSR:
    """Make ``model`` an exact bilinear x2/x4 upscaler without removing any of its work.

    The head copies the RGB channels into features 0-2; the body runs with its random weights but its last conv is
    zero, so the long skip passes the head's output on; each upsampler conv turns features 0-2 into the four
    sub-pixel phases of a bilinear x2 (PixelShuffle channel c*4 + 2*i + j is phase (i, j) of channel c); the last conv
    picks features 0-2. The mean shifts cancel. Dense convolutions cost the same whatever their weights.
    """
    taps = (torch.tensor([0.25, 0.75, 0.0]), torch.tensor([0.0, 0.75, 0.25]))  # rows/cols y-1, y, y+1 per phase
    with torch.no_grad():
        convs = [model.head[0], model.body[-1], *[m for m in model.tail[0] if isinstance(m, nn.Conv2d)], model.tail[1]]
        for conv in convs:
            conv.weight.zero_()
            conv.bias.zero_()
        for c in range(3):
            model.head[0].weight[c, c, 1, 1] = 1.0
            model.tail[1].weight[c, c, 1, 1] = 1.0
            for conv in convs[2:-1]:
                for i in (0, 1):
                    for j in (0, 1):
                        conv.weight[c * 4 + 2 * i + j, c] = torch.outer(taps[i], taps[j])
    return model


# --------------------------------------------------------------------------------------------------------------------
# Codecs


@dataclass
class CodecTiming:
    name: str
    seconds: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    note: str = ""

    @property
    def ms(self) -> float:
        return 1000 * statistics.median(self.seconds)


def _timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def _pillow_decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def upscaled_stand_ins(inputs: list[bytes]) -> list[DecodedImage]:
    """1080x1920 images with the content of upscaled photos (bilinear, as the benchmark models produce)."""
    h, w = LR_SHAPE
    return [
        DecodedImage.from_array(np.asarray(Image.open(io.BytesIO(d)).convert("RGB").resize((w * 4, h * 4), 2)))
        for d in inputs
    ]


def codec_timings(inputs: list[bytes], count: int) -> list[CodecTiming]:
    """One core: each decoder and encoder on ``count`` images (WebP on fewer: it is slow)."""
    sample = inputs[:count]
    outputs = upscaled_stand_ins(sample)
    spng, pillow = CodecTiming("decode 270x480 PNG, libspng (pyspng)"), CodecTiming("decode 270x480 PNG, Pillow")
    decode_image(sample[0]), _pillow_decode(sample[0])  # first calls load libraries: not timed
    for data in sample:
        a, decoded = _timed(decode_image, data)
        b, reference = _timed(_pillow_decode, data)
        assert np.array_equal(decoded.rgb, reference)
        spng.seconds.append(a)
        pillow.seconds.append(b)
    timings = [spng, pillow]
    for label, fmt, compression in (*FORMATS, ("WebP q90", "webp", "fast")):
        timing = CodecTiming(f"encode 1080x1920 {label}")
        options = CodecOptions(fmt=fmt, png_compression=compression, quality=90 if fmt == "webp" else 95)
        encode_output(outputs[0], fmt, options)  # warm-up, not timed
        for img in outputs[: max(2, count // 4) if fmt == "webp" else count]:
            seconds, data = _timed(encode_output, img, fmt, options)
            timing.seconds.append(seconds)
            timing.sizes.append(len(data))
        timings.append(timing)
    # The size check every encode ends with (its header read back), alone: part of each encode timed above.
    check = CodecTiming(CHECK_LABEL)
    png = encode_output(outputs[0], "png", CodecOptions(fmt="png"))
    for _ in range(count):
        start = time.perf_counter()
        for _ in range(1000):
            check_encoded_size(png, "png", outputs[0].width, outputs[0].height)
        check.seconds.append((time.perf_counter() - start) / 1000)
    return [*timings, check]


_POOL_INPUTS: list[bytes] = []
_POOL_OUTPUTS: list[DecodedImage] = []


def _pool_init(inputs: list[bytes]) -> None:
    torch.set_num_threads(1)
    _POOL_INPUTS[:] = inputs
    _POOL_OUTPUTS[:] = upscaled_stand_ins(inputs)


def _pool_codec(task: tuple[int, str, str]) -> int:
    i, fmt, compression = task
    decode_image(_POOL_INPUTS[i])
    return len(encode_output(_POOL_OUTPUTS[i], fmt, CodecOptions(fmt=fmt, png_compression=compression)))


def codec_only_rate(inputs: list[bytes], fmt: str, compression: str, workers: int) -> float:
    """Images/s of decode + encode in ``workers`` processes (what the codec tasks could do with no model at all)."""
    with ProcessPoolExecutor(workers, initializer=_pool_init, initargs=(inputs,)) as pool:
        list(pool.map(_pool_codec, [(i % len(inputs), fmt, compression) for i in range(workers)]))  # warm up
        start = time.perf_counter()
        list(pool.map(_pool_codec, [(i, fmt, compression) for i in range(len(inputs))]))
        return len(inputs) / (time.perf_counter() - start)


# --------------------------------------------------------------------------------------------------------------------
# Model only, and the job


def model_only_rate(model_path: str, source: str, inputs: int, plan: batch.ModelWorkers, rounds: int = 1) -> float:
    """Images/s of the job's model stage in actors set up like the job's, on images decoded beforehand."""
    import ray

    from edsr_ray.batch.inputs import plan_tasks
    from edsr_ray.batch.stages import UpscaleBatch, decode_batch, tasks_table
    from edsr_ray.weights import load_model, model_checkpoint

    @ray.remote
    class ModelOnly:
        def __init__(self, checkpoint: list, threads, device):
            self.stage = UpscaleBatch(checkpoint, SCALE, {}, device=device, threads=threads)

        def warm_up(self, table, size: int) -> None:
            self.stage(table.slice(0, size))

        def run(self, table, size: int, rounds: int) -> int:
            for _ in range(rounds):
                for start in range(0, table.num_rows, size):
                    self.stage(table.slice(start, size))
            return rounds * table.num_rows

    tasks = plan_tasks(source, f"s3://{BUCKET}/unused", "png").tasks
    decoded = ray.put(decode_batch(tasks_table(tasks[:inputs])))
    checkpoint = ray.put(model_checkpoint(load_model(model_path)))
    actors = [
        ModelOnly.options(**plan.remote_args).remote([checkpoint], plan.threads, plan.device)
        for _ in range(plan.actors)
    ]
    ray.get([a.warm_up.remote(decoded, plan.batch_size) for a in actors])
    start = time.perf_counter()
    done = sum(ray.get([a.run.remote(decoded, plan.batch_size, rounds) for a in actors]))
    rate = done / (time.perf_counter() - start)
    for a in actors:
        ray.kill(a)
    return rate


@dataclass
class JobTiming:
    end_to_end: float  # 2N images, actor start included
    steady: float  # N / (T(2N) - T(N)): the fixed costs (actor start, pipeline fill and drain) cancel out
    images: int


def job_rate(model_path: str, source: str, output: str, fmt: str, compression: str) -> JobTiming:
    """The whole job, S3 to S3, on the N inputs under ``source``/n and the 2N under ``source``/2n."""
    seconds, written = [], 0
    for part in ("n", "2n"):
        summary = batch.run_upscale(
            model_path,
            f"{source}/{part}",
            f"{output}/{part}",
            options=CodecOptions(fmt=fmt, png_compression=compression),
            progress=False,
        )
        assert summary.count("failed") == 0 and summary.count("skipped") == 0, summary.line()
        seconds.append(summary.seconds)
        written = summary.written
    n = written // 2
    return JobTiming(written / seconds[1], n / (seconds[1] - seconds[0]), written)


# --------------------------------------------------------------------------------------------------------------------
# Report


@dataclass
class Row:
    model: str
    output: str
    model_only: float
    codec_only: float
    job: JobTiming
    note: str = ""

    @property
    def bound(self) -> float:
        return min(self.model_only, self.codec_only)


def report(machine_line: str, setup: str, codecs: list[CodecTiming], rows: list[Row]) -> str:
    spng, pillow = codecs[0], codecs[1]
    fast, small = codecs[2], codecs[3]
    lines = [
        f"\n## bench_upscale.py — {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}\n",
        f"Machine: {machine_line}.  ",
        f"{setup}\n",
        "Codecs, one core (median ms per image; sizes are means):\n",
        "| operation | ms | per core img/s | size |",
        "|---|---:|---:|---:|",
    ]
    for c in codecs:
        if c.name == CHECK_LABEL:
            continue  # a few microseconds: reported in the notes, against the encode it is part of
        size = f"{statistics.mean(c.sizes) / 1024:.0f} KiB" if c.sizes else ""
        lines.append(f"| {c.name} | {c.ms:.1f} | {1000 / c.ms:.0f} | {size} |")
    lines += [
        "",
        f"Decode libspng / Pillow: {pillow.ms / spng.ms:.2f}x faster; encode fpng / Pillow zlib 6: "
        f"{small.ms / fast.ms:.1f}x faster, files {statistics.mean(fast.sizes) / statistics.mean(small.sizes):.2f}x "
        "the size.\n",
        "Rates (img/s); *bound* = min(model only, codec only); the job's ratio uses its steady rate:\n",
        "| model | output | model only | codec only | job end to end | job steady | steady / bound | note |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.output} | {r.model_only:.2f} | {r.codec_only:.2f} | {r.job.end_to_end:.2f} | "
            f"{r.job.steady:.2f} | {r.job.steady / r.bound:.2f} | {r.note} |"
        )
    return "\n".join([*lines, "", *notes(codecs, rows)]) + "\n"


def notes(codecs: list[CodecTiming], rows: list[Row]) -> list[str]:
    """What the figures say, computed from them (projections from one core are marked as such)."""
    spng, fast, small, jpeg = codecs[0], codecs[2], codecs[3], codecs[4]
    png_ms, slow_ms, jpeg_ms = spng.ms + fast.ms, spng.ms + small.ms, spng.ms + jpeg.ms
    out = [
        f"Codec cost per image (decode + encode, one core): PNG fpng {png_ms:.1f} ms, PNG zlib 6 {slow_ms:.0f} ms, "
        f"JPEG q95 {jpeg_ms:.1f} ms. Projected to the 15 codec cores of a 16-core GPU node: {15000 / png_ms:.0f}, "
        f"{15000 / slow_ms:.0f} and {15000 / jpeg_ms:.0f} img/s: with fpng lossless output keeps up with one GPU "
        "(an H200 runs the baseline x4 at 209 img/s in bf16, 557 compiled), with Pillow's default PNG it cannot."
    ]
    check = next(c for c in codecs if c.name == CHECK_LABEL)
    out.append(
        f"Every encode ends with a size check (its header read back, so an encoder that wrote another size fails the "
        f"image): {1000 * check.ms:.1f} µs per image, {100 * check.ms / fast.ms:.3f}% of an fpng encode."
    )
    by_note = {r.note: r for r in rows if r.model.startswith("EDSR baseline")}
    if "glibc settings" in by_note and "plain glibc" in by_note:
        on, off = by_note["glibc settings"], by_note["plain glibc"]
        out.append(
            f"glibc settings on CPU actors: model only {on.model_only / off.model_only:.2f}x, job (steady) "
            f"{on.job.steady / off.job.steady:.2f}x faster."
        )
    return out


def upload(prefix: str, inputs: list[bytes]) -> None:
    """The inputs under ``prefix``/n and twice as many (the same, then as many more) under ``prefix``/2n."""
    from edsr_ray import storage

    for i, data in enumerate(inputs):
        storage.write_bytes(f"{prefix}/2n/{i:05d}.png", data)
        if i < len(inputs) // 2:
            storage.write_bytes(f"{prefix}/n/{i:05d}.png", data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=32, help="N for the tiny model (runs of N and 2N; default 32)")
    p.add_argument("--baseline-images", type=int, default=None, help="N for the baseline (6 on CPU, 256 on GPU)")
    p.add_argument("--codec-images", type=int, default=12, help="images per codec timing (default 12)")
    p.add_argument("--no-baseline", action="store_true", help="skip the EDSR baseline x4 runs")
    p.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = p.parse_args()

    import ray

    from edsr_ray.infra.objectstore import EmbeddedS3

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    on_gpu = torch.cuda.is_available()
    baseline_images = args.baseline_images or (256 if on_gpu else 6)
    machine_line = f"{machine('cuda' if on_gpu else 'cpu')}; load average at start {load_average()}"
    print(machine_line, flush=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp, EmbeddedS3(Path(tmp) / "s3", buckets=(BUCKET,)) as s3:
        os.environ.update(s3.env())  # before Ray starts, so that its workers reach the server
        inputs = make_inputs(2 * max(args.images, baseline_images))
        tiny_in, base_in = f"s3://{BUCKET}/tiny/in", f"s3://{BUCKET}/baseline/in"
        upload(tiny_in, inputs[: 2 * args.images])
        torch.manual_seed(0)
        tiny_path, base_path = str(Path(tmp) / "tiny_x4.pt"), str(Path(tmp) / "baseline_x4.pt")
        save_model(bilinear_weights(EDSR(4, 16, SCALE)), tiny_path)
        save_model(bilinear_weights(edsr_baseline(SCALE)), base_path)

        codecs = codec_timings(inputs, args.codec_images)
        for c in codecs:
            print(f"{c.name}: {c.ms:.1f} ms", flush=True)

        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        resources = ray.cluster_resources()
        plan = batch.model_workers(resources, batch.ComputeOptions())
        codec_cpus = max(1, int(resources.get("CPU", 1) - plan.actors * plan.remote_args["num_cpus"]))
        setup = (
            f"Inputs: PNG photos of {LR_SHAPE[0]}x{LR_SHAPE[1]} on the embedded S3 → x4 (1080x1920) back to S3. Job: "
            f"Ray Data, {plan.actors} model actor(s) {'on GPU' if plan.device is None else 'on CPU'}, batches of "
            f"{plan.batch_size}, codec tasks on the other {codec_cpus} CPU(s); codec-only rate with {codec_cpus} "
            f"process(es). Bilinear-weight models (see the script). Job runs of N and 2N images, N = {args.images} "
            f"(tiny model), {baseline_images} (baseline): end to end = 2N / T(2N), steady = N / (T(2N) - T(N)); "
            "model only: N images after a warm-up batch."
        )

        codec_rates: dict[tuple[str, str, int], float] = {}  # the codecs do not depend on the model or its actors

        def case(model: str, path: str, source: str, n: int, output: tuple[str, str, str], model_rate: float, note=""):
            label, fmt, compression = output
            job = job_rate(path, source, f"s3://{BUCKET}/out-{len(rows)}", fmt, compression)
            if (fmt, compression, n) not in codec_rates:
                codec_rates[fmt, compression, n] = codec_only_rate(inputs[: 2 * n], fmt, compression, codec_cpus)
            codec = codec_rates[fmt, compression, n]
            row = Row(model, label, model_rate, codec, job, note)
            rows.append(row)
            print(
                f"{model}, {label}, {note}: model {row.model_only:.2f}, codec {row.codec_only:.2f}, job "
                f"{job.end_to_end:.2f} (steady {job.steady:.2f}), steady/bound {job.steady / row.bound:.2f}",
                flush=True,
            )

        glibc = dict(batch.CPU_ACTOR_ENV)
        tiny_rate = model_only_rate(tiny_path, f"{tiny_in}/n", args.images, plan)
        for output in FORMATS:
            case("tiny EDSR x4", tiny_path, tiny_in, args.images, output, tiny_rate, "glibc settings")
        if not args.no_baseline:
            upload(base_in, inputs[: 2 * baseline_images])
            # On GPUs the actors are not CPU actors: the glibc settings do not apply.
            settings = [(glibc, "")] if on_gpu else [(glibc, "glibc settings"), ({}, "plain glibc")]
            for env, note in settings:
                # The job reads this module constant when it sizes its CPU actors: the benchmark's switch.
                batch.CPU_ACTOR_ENV = env
                workers = batch.model_workers(resources, batch.ComputeOptions())
                rate = model_only_rate(base_path, f"{base_in}/n", baseline_images, workers)
                case("EDSR baseline x4", base_path, base_in, baseline_images, FORMATS[0], rate, note)
            batch.CPU_ACTOR_ENV = glibc
        ray.shutdown()

    text = report(machine_line, setup, codecs, rows)
    print(text)
    if not args.no_write:
        append_results(text)


if __name__ == "__main__":
    sys.exit(main())
