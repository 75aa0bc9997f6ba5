"""Images per second of the shared inference path, 270x480 → 1080p at x4, next to a plain PyTorch forward.

    python benchmarks/bench_inference.py [--iters 3] [--paper-iters 1] [--no-paper] [--no-write]

For the baseline and the paper EDSR x4 (random weights: speed does not depend on them) it times, in one run:
a plain ``model(x)`` in fp32 on a tensor already on the device (the reference, ratio 1.0), the Upscaler on a uint8
numpy image in fp32 (what users get: transfer, conversion and quantisation included), the Upscaler with tiles, and
on a GPU bf16 + channels_last, fp16, ``torch.compile`` and batches of 8 images. The cases of one model are timed in
interleaved rounds (A, B, C, A, B, C, ...) and reported as medians, so a load change on a shared machine hits them
alike; each figure is printed as a ratio to the plain fp32 forward, and a section is appended to
``benchmarks/RESULTS.md`` naming the machine and its load.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from _machine import append_results, load_average, machine  # what every benchmark here records

from edsr_ray.inference import Upscaler
from edsr_ray.models import edsr_baseline, edsr_paper, receptive_radius
from edsr_ray.samples import photo

LR_SHAPE = (270, 480)
SCALE = 4
# glibc settings that keep freed memory in the process instead of unmapping every large block (see bench_model).
NO_MMAP_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}


@dataclass
class Case:
    model: str
    mode: str
    fn: Callable[[], object]
    images: int = 1
    note: str = ""
    times: list[float] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.images / statistics.median(self.times)


def run_rounds(cases: list[Case], iters: int, warmup: int, device: torch.device) -> None:
    """Warm every case up, then time one call of each case per round, for ``iters`` rounds."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for case in cases:
        for _ in range(warmup):
            case.fn()
    sync()
    for _ in range(iters):
        for case in cases:
            start = time.perf_counter()
            case.fn()
            sync()
            case.times.append(time.perf_counter() - start)


def lr_image() -> np.ndarray:
    """A real 270x480 photo crop (content does not change the speed, but keeps outputs in range)."""
    h, w = LR_SHAPE
    return np.ascontiguousarray(photo("motorcycle_left.png")[:h, :w])


def plain_forward(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return model(x, SCALE)

    return run


def cases_for(name: str, model: torch.nn.Module, device: torch.device, tiles: tuple[int, ...]) -> list[Case]:
    image = lr_image()
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float().to(device)  # (1, 3, 270, 480)
    model = model.to(device).eval()
    up = Upscaler(model, precision="fp32", device=device)
    cases = [
        Case(name, "plain forward fp32", plain_forward(model, x), note="model(x) on a device tensor"),
        Case(name, "Upscaler fp32", lambda: up.upscale(image, SCALE), note="uint8 numpy in and out"),
    ]
    radius = receptive_radius(model)
    for tile in tiles:
        tiled = Upscaler(model, precision="fp32", device=device, tile=tile)
        plan = tiled.plan(*LR_SHAPE, 1, SCALE)
        n = len(plan.rows.cores) * len(plan.cols.cores)
        area = n * plan.rows.patch * plan.cols.patch / (LR_SHAPE[0] * LR_SHAPE[1])
        note = f"{n} patches of {plan.rows.patch}x{plan.cols.patch} (radius {radius}): {area:.2f}x the pixels"
        cases.append(Case(name, f"Upscaler fp32, tile {tile}", lambda t=tiled: t.upscale(image, SCALE), note=note))
    if device.type == "cuda":
        batch = torch.from_numpy(np.stack([image] * 8)).permute(0, 3, 1, 2).float().to(device)  # (8, 3, 270, 480)
        for precision in ("bf16", "fp16"):
            low = Upscaler(model, precision=precision, device=device)
            cases.append(Case(name, f"Upscaler {precision} channels_last", lambda u=low: u.upscale(image, SCALE)))
            cases.append(
                Case(name, f"Upscaler {precision}, batch 8", lambda u=low: u.upscale_tensor(batch, SCALE), images=8)
            )
        tiled = Upscaler(model, precision="bf16", device=device, tile=128)
        cases.append(Case(name, "Upscaler bf16, tile 128", lambda: tiled.upscale(image, SCALE)))
        compiled = Upscaler(model, precision="bf16", device=device, compile=True)
        cases.append(Case(name, "Upscaler bf16 compiled", lambda: compiled.upscale(image, SCALE)))
        cases.append(
            Case(name, "Upscaler bf16 compiled, batch 8", lambda: compiled.upscale_tensor(batch, SCALE), images=8)
        )
    return cases


def child_rates(iters: int, warmup: int) -> list[float]:
    """Baseline plain and Upscaler fp32 rates in a child process started with :data:`NO_MMAP_ENV`."""
    cmd = [sys.executable, __file__, "--child", str(iters), str(warmup)]
    out = subprocess.run(cmd, env={**os.environ, **NO_MMAP_ENV}, capture_output=True, text=True, check=True).stdout
    return [float(v) for v in out.strip().splitlines()[-1].split()]


def child(iters: int, warmup: int) -> None:
    torch.manual_seed(0)
    cases = cases_for("EDSR baseline x4", edsr_baseline(SCALE), torch.device("cpu"), tiles=())
    run_rounds(cases, iters, warmup, torch.device("cpu"))
    print(" ".join(str(c.images_per_s) for c in cases))


def report(cases: list[Case], machine_line: str, device: torch.device) -> str:
    lines = [
        f"\n## bench_inference.py — {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}\n",
        f"Machine: {machine_line}. Device: {device}. Input 270x480 RGB → 1080x1920 (x4), random weights; medians "
        "of interleaved rounds.\n",
        "| model | mode | img/s | × plain fp32 | note |",
        "|---|---|---:|---:|---|",
    ]
    reference = {c.model: c.images_per_s for c in cases if c.mode == "plain forward fp32"}
    for c in cases:
        ratio = c.images_per_s / reference[c.model]
        lines.append(f"| {c.model} | {c.mode} | {c.images_per_s:.3f} | {ratio:.2f} | {c.note} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=None, help="timed rounds (default: 3 on CPU, 20 on GPU)")
    p.add_argument("--paper-iters", type=int, default=None, help="timed rounds for paper EDSR (1 on CPU, 10 on GPU)")
    p.add_argument("--no-paper", action="store_true", help="skip the 43 M parameter paper model")
    p.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    p.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    iters = args.iters or (20 if on_gpu else 3)
    paper_iters = args.paper_iters or (10 if on_gpu else 1)
    machine_line = (
        f"{machine(device.type)}; {torch.get_num_threads()} torch threads; load average (1/5/15 min) {load_average()} "
        "at start"
    )
    print(machine_line, flush=True)
    torch.manual_seed(0)

    baseline = cases_for("EDSR baseline x4", edsr_baseline(SCALE), device, tiles=(256, 128) if on_gpu else (256,))
    run_rounds(baseline, iters, 3 if on_gpu else 1, device)
    all_cases = list(baseline)
    if not on_gpu:
        # PyTorch's CPU allocator returns large tensors to the OS, so glibc maps (and the kernel zeroes) fresh pages for
        # every big activation; a child process shows what keeping them costs nothing buys. Set before the first
        # malloc, so it cannot be measured in this process.
        for mode, rate in zip(("plain forward fp32", "Upscaler fp32"), child_rates(iters, 1)):
            env = " ".join(f"{k}={v}" for k, v in NO_MMAP_ENV.items())
            all_cases.append(Case("EDSR baseline x4", f"{mode}, glibc without mmap", None, note=env, times=[1 / rate]))
    if not args.no_paper:
        # On CPU one paper-model image takes minutes: no warm-up, one round, no tiles.
        paper = cases_for("EDSR paper x4", edsr_paper(SCALE), device, tiles=(256,) if on_gpu else ())
        run_rounds(paper, paper_iters, 3 if on_gpu else 0, device)
        all_cases += paper
    text = report(all_cases, machine_line, device)
    print(text)
    if not args.no_write:
        append_results(text)


if __name__ == "__main__":
    main()
