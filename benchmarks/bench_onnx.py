"""ONNX Runtime on CPU against PyTorch on CPU: the same network (baseline EDSR x4), the same image, the same threads.

    python benchmarks/bench_onnx.py [--size 135 240] [--iters 3] [--threads N] [--no-write]

The model is exported with edsr_ray.export (fp32, the default opset) and run by ONNX Runtime's CPU provider with all
graph optimisations. PyTorch runs the same [0, 1] graph (the network inside edsr_ray.export.FixedScale) once on an
NCHW-contiguous input, the layout PyTorch gives by default, and once on a channels_last (NHWC-strided) input, with
which its CPU convolutions use the blocked layout ONNX Runtime uses. The project's inference path (Upscaler, uint8 in
and out) is timed beside them. Cases are timed in interleaved rounds after a warm-up each, so a load change on a
shared machine hits them alike; wall and CPU seconds are reported as medians, and speeds as ratios to ONNX Runtime
(> 1: faster than ONNX Runtime). A section is appended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
import torch
from _machine import append_results, load_average, machine  # what every benchmark here records

from edsr_ray.export import DEFAULT_OPSET, FixedScale, to_onnx
from edsr_ray.inference import Upscaler
from edsr_ray.models import edsr_baseline
from edsr_ray.samples import photo

SCALE = 4


@dataclass
class Case:
    name: str
    fn: Callable[[], np.ndarray]
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", nargs=2, type=int, default=(270, 480), metavar=("H", "W"), help="LR input size")
    p.add_argument("--iters", type=int, default=3, help="timed rounds")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for both runtimes")
    p.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = p.parse_args()
    h, w = args.size
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = edsr_baseline(SCALE).eval()
    graph = FixedScale(net, SCALE).eval()
    data = to_onnx(net, SCALE, opset=DEFAULT_OPSET, fp16=False, source="benchmark").SerializeToString()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])

    image = np.ascontiguousarray(photo("motorcycle_left.png")[:h, :w])  # (h, w, 3) uint8, a real photo
    x = np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32) / 255  # (1, 3, h, w) NCHW
    nchw = torch.from_numpy(x)
    nhwc = nchw.contiguous(memory_format=torch.channels_last)  # same values, NHWC strides
    up = Upscaler(net, precision="fp32", device="cpu")

    def torch_forward(t: torch.Tensor) -> Callable[[], np.ndarray]:
        def run() -> np.ndarray:
            with torch.inference_mode():
                return graph(t).contiguous().numpy()

        return run

    cases = [
        Case("ONNX Runtime CPU", lambda: session.run(None, {"input": x})[0]),
        Case("PyTorch, NCHW input", torch_forward(nchw)),
        Case("PyTorch, channels_last input", torch_forward(nhwc)),
        Case("Upscaler (uint8 in and out)", lambda: up.upscale(image, SCALE)),
    ]
    outputs = {c.name: c.fn() for c in cases}  # warm-up, and the outputs compared below
    for _ in range(args.iters):
        for case in cases:
            t0, c0 = time.perf_counter(), time.process_time()
            case.fn()
            case.wall.append(time.perf_counter() - t0)
            case.cpu.append(time.process_time() - c0)

    reference = outputs["ONNX Runtime CPU"]
    diff_nchw = float(np.abs(outputs["PyTorch, NCHW input"] - reference).max()) * 255
    diff_nhwc = float(np.abs(outputs["PyTorch, channels_last input"] - reference).max()) * 255
    ort_wall = statistics.median(cases[0].wall)
    ort_cpu = statistics.median(cases[0].cpu)
    machine_line = (
        f"{machine('cpu')}; onnxruntime {ort.__version__}; {args.threads} thread(s) for each runtime; load average "
        f"(1/5/15 min) {load_average()} at start"
    )
    lines = [
        f"\n## bench_onnx.py — {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}\n",
        f"Machine: {machine_line}.  ",
        f"Baseline EDSR x4 (random weights), input {h}x{w} RGB (a photo crop) → {h * SCALE}x{w * SCALE}; opset "
        f"{DEFAULT_OPSET}, fp32; medians of {args.iters} interleaved rounds after a warm-up. Speed = ONNX Runtime's "
        "time / the case's time (> 1: faster than ONNX Runtime).\n",
        "| case | wall s | CPU s | speed vs ORT (wall) | speed vs ORT (CPU) |",
        "|---|---:|---:|---:|---:|",
    ]
    for case in cases:
        wall, cpu = statistics.median(case.wall), statistics.median(case.cpu)
        lines.append(f"| {case.name} | {wall:.3f} | {cpu:.3f} | {ort_wall / wall:.2f} | {ort_cpu / cpu:.2f} |")
    lines.append(
        f"\nmax |PyTorch - ONNX Runtime|: NCHW input {diff_nchw:.1e}, channels_last input {diff_nhwc:.1e} grey levels."
    )
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        append_results(text)


if __name__ == "__main__":
    main()
