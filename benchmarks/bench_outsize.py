"""What an output size (--outscale, --width, --height) adds to the CPU work of an image, beside what it costs.

    python benchmarks/bench_outsize.py [--rounds 3] [--no-model] [--no-write]

One 270x480 input (a real photo, downscaled and cropped) and its 1080x1920 x4 output, measured on one thread, in
interleaved rounds (medians), CPU seconds per image:

* the encode stage as it is without a size asked for: the x4 output written as PNG with fpng (the job's default);
* the resize the encode stage adds for a size (:func:`edsr_ray.outsize.resize_decoded`, the antialiased MATLAB
  bicubic): --outscale 3 and 3.5 (x4 shrunk), --width 3840 (8x: x4 enlarged), and an RGBA image's alpha plane;
* for scale, one forward of the EDSR baseline x4 through the shared inference path (the model stage's work per image
  on this CPU; a GPU does it in a small fraction of that).

The ratios say how many encode stages' worth of CPU a resize is, and how it compares with the model: why the resize
runs in the CPU encode tasks (as many as there are spare cores) and never in the model's actor. A section is appended
to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread, as each encode task of the job has one CPU

import numpy as np  # imported after the thread setting above
import torch
from _machine import append_results, load_average, machine

from edsr_ray.codecs import DecodedImage, encode_image
from edsr_ray.imaging import imresize
from edsr_ray.inference import Upscaler
from edsr_ray.models import edsr_baseline
from edsr_ray.outsize import OutputSize, resize_decoded
from edsr_ray.samples import photo

SCALE = 4
INPUT = (270, 480)


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="timed rounds after a warm-up (default 3)")
    p.add_argument("--no-model", action="store_true", help="skip the EDSR baseline forward")
    p.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = p.parse_args()
    torch.set_num_threads(1)
    machine_line = f"{machine()}; 1 thread; load average (1/5/15 min) {load_average()} at start"
    print(machine_line, flush=True)

    source = photo("chelsea.png")  # (300, 451, 3): a real photo, so the codecs see real content
    lr = imresize(source, output_shape=(INPUT[0], 451 * INPUT[0] // 300))[:, : INPUT[1]]
    lr = np.ascontiguousarray(np.pad(lr, ((0, 0), (0, INPUT[1] - lr.shape[1]), (0, 0)), mode="reflect"))
    out = DecodedImage(imresize(lr, output_shape=(INPUT[0] * SCALE, INPUT[1] * SCALE)))  # stands in for the x4 output
    alpha = np.linspace(0, 255, out.height * out.width).reshape(out.height, out.width).astype(np.uint8)
    rgba = DecodedImage(out.rgb, alpha, 8, False, None, "RGBA")
    h, w = INPUT
    cases = {"encode: PNG (fpng) of the x4 output, no size asked": lambda: encode_image(out, "png")}
    for label, size in (
        ("resize: --outscale 3 (x4 shrunk)", OutputSize(outscale="3")),
        ("resize: --outscale 3.5 (x4 shrunk)", OutputSize(outscale="3.5")),
        ("resize: --width 3840 (8x: x4 enlarged)", OutputSize(width=3840)),
    ):
        final = size.final_shape(h, w)
        cases[f"{label} → {final[1]}x{final[0]}"] = lambda final=final: resize_decoded(out, final)
    final = OutputSize(outscale="3").final_shape(h, w)
    cases[f"resize: --outscale 3 of an RGBA image → {final[1]}x{final[0]}"] = lambda: resize_decoded(rgba, final)
    if not args.no_model:
        torch.manual_seed(0)
        upscaler = Upscaler(edsr_baseline(SCALE).eval(), device="cpu")
        cases["model: EDSR baseline x4 forward (Upscaler, fp32)"] = lambda: upscaler.upscale(lr, SCALE)

    for fn in cases.values():  # warm-up: page faults and first-call costs
        fn()
    times: dict[str, list[float]] = {label: [] for label in cases}
    for r in range(args.rounds):
        for label, fn in cases.items():
            times[label].append(cpu_seconds(fn))
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    encode = statistics.median(times[next(iter(cases))])
    model = statistics.median(times[list(cases)[-1]]) if not args.no_model else None
    lines = [
        f"## bench_outsize.py — {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}\n",
        f"Machine: {machine_line}.  ",
        f"Input {w}x{h} RGB (a photo crop), its {w * SCALE}x{h * SCALE} x4 output; CPU seconds per image, medians of "
        f"{args.rounds} interleaved rounds after a warm-up.\n",
        "| work | CPU s | × the encode | × the model forward |",
        "|---|---:|---:|---:|",
    ]
    for label in cases:
        t = statistics.median(times[label])
        vs_model = f"{t / model:.3f}" if model else "-"
        lines.append(f"| {label} | {t:.3f} | {t / encode:.1f} | {vs_model} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        append_results(text)


if __name__ == "__main__":
    main()
