"""Load test of the upscaling service: N requests at concurrency C, with Serve batching on and off in one run.

Starts a local Ray + Serve instance on 127.0.0.1 with a random-weight model (``--model tiny`` or ``baseline``, the
paper's 1.5 M parameter EDSR baseline), deploys the application of :mod:`edsr_ray.serving` once with
``max_batch_size=--batch`` and once with ``max_batch_size=1``, and sends the same requests to each (asyncio + httpx,
raw PNG bodies, distinct crops of a real photo). Prints p50/p95/p99 latency, throughput and errors per mode and the
batched/unbatched throughput ratio, and appends a section to ``benchmarks/RESULTS.md`` naming the machine.

Targets: 0 errors over 1000 requests at concurrency 32; on a GPU (``--device cuda --model baseline``), batching at
least 2x the unbatched throughput for 128x128 inputs at x4. On a CPU the forward pass is compute-bound at any batch
size, so the ratio there says little; it measures the service's overhead instead.

    python benchmarks/bench_serve.py --requests 1000 --concurrency 32
    python benchmarks/bench_serve.py --device cuda --model baseline --requests 2000 --concurrency 64 --batch 16
"""

import argparse
import asyncio
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _machine import append_results, load_average, machine  # what every benchmark here records


@dataclass
class Outcome:
    mode: str
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]
    error_examples: list[str]

    @property
    def throughput(self) -> float:
        return (self.requests - self.errors) / self.seconds

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_inputs(size: int, count: int = 16) -> list[bytes]:
    """Distinct size x size PNG crops of a real photo (so no two consecutive requests carry identical bytes)."""
    import numpy as np

    from edsr_ray.codecs import encode_image
    from edsr_ray.imaging import imresize
    from edsr_ray.samples import photo

    source = photo("astronaut.png")  # (512, 512, 3)
    if min(source.shape[:2]) < 2 * size:
        source = imresize(source, output_shape=(4 * size, 4 * size))
    rng = np.random.default_rng(0)
    crops = []
    for _ in range(count):
        y = int(rng.integers(0, source.shape[0] - size + 1))
        x = int(rng.integers(0, source.shape[1] - size + 1))
        crops.append(encode_image(np.ascontiguousarray(source[y : y + size, x : x + size]), "png"))
    return crops


async def load(url: str, bodies: list[bytes], n: int, concurrency: int, scale: int) -> tuple[float, list, list]:
    """Send n requests, at most ``concurrency`` in flight; (wall seconds, latencies ms, error descriptions)."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    queue = iter(range(n))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker() -> None:
            for i in queue:  # one shared iterator: each request index is taken by exactly one worker
                start = time.perf_counter()
                try:
                    r = await client.post("/v1/upscale", params={"scale": scale}, content=bodies[i % len(bodies)])
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.text[:200]}")
                        continue
                except httpx.HTTPError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                latencies.append((time.perf_counter() - start) * 1e3)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start, latencies, errors


def run_mode(mode: str, settings: dict, url: str, bodies: list[bytes], args: argparse.Namespace) -> Outcome:
    from ray import serve

    from edsr_ray.serving import build_app, load_settings

    serve.run(
        build_app(load_settings(settings)), name="bench", route_prefix="/", logging_config={"log_level": "WARNING"}
    )
    # Warm-up: load the model, prepare its precision copy, and let CUDA pick its kernels for every batch size.
    asyncio.run(load(url, bodies, args.warmup, min(args.concurrency, args.warmup), args.scale))
    seconds, latencies, errors = asyncio.run(load(url, bodies, args.requests, args.concurrency, args.scale))
    serve.delete("bench")
    return Outcome(mode, args.requests, len(errors), seconds, latencies, errors[:3])


def report(outcomes: list[Outcome], args: argparse.Namespace, machine_line: str) -> str:
    lines = [
        f"\n## bench_serve.py — {time.strftime('%Y-%m-%d %H:%M')}\n",
        f"Machine: {machine_line}  ",
        f"{args.requests} requests at concurrency {args.concurrency}; {args.size}x{args.size} PNG → x{args.scale} PNG; "
        f"model {args.model} ({args.device}); batching: max_batch_size {args.batch}, "
        f"batch_wait_timeout_s {args.batch_wait}.\n",
        "| mode | throughput (img/s) | p50 (ms) | p95 (ms) | p99 (ms) | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for o in outcomes:
        lines.append(
            f"| {o.mode} | {o.throughput:.1f} | {o.percentile(50):.0f} | {o.percentile(95):.0f} | "
            f"{o.percentile(99):.0f} | {o.errors} |"
        )
    by_mode = {o.mode: o for o in outcomes}
    if {"batched", "unbatched"} <= by_mode.keys() and by_mode["unbatched"].throughput > 0:
        ratio = by_mode["batched"].throughput / by_mode["unbatched"].throughput
        lines.append(f"\nBatched / unbatched throughput: {ratio:.2f}x (measured in this run, same requests).")
        if args.device == "cpu":
            lines.append(
                "On a CPU the forward pass is compute-bound at any batch size, so batching cannot pay off here; the "
                "2x target is for GPUs (`--device cuda --model baseline`)."
            )
        else:
            lines.append(f"GPU target (batched >= 2x unbatched): {'met' if ratio >= 2 else 'NOT met'}.")
    total_errors = sum(o.errors for o in outcomes)
    lines.append(f"Errors: {total_errors} over {sum(o.requests for o in outcomes)} requests.")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1000, help="timed requests per mode")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    p.add_argument("--size", type=int, default=128, help="input side in pixels")
    p.add_argument("--scale", type=int, default=4, choices=(2, 3, 4))
    p.add_argument("--model", choices=("tiny", "baseline"), default="tiny", help="tiny: 1 block x 8 features")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: one GPU for the model replica")
    p.add_argument("--batch", type=int, default=16, help="max_batch_size of the batched mode")
    p.add_argument("--batch-wait", type=float, default=0.01, help="batch_wait_timeout_s of the batched mode")
    p.add_argument("--warmup", type=int, default=64, help="untimed requests before each mode")
    p.add_argument("--modes", default="batched,unbatched", help="comma-separated: batched, unbatched")
    p.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = p.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import torch
    from ray import serve

    from edsr_ray.models import EDSR, edsr_baseline
    from edsr_ray.weights import save_model

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to PyTorch on this machine")
    machine_line = f"{machine(args.device)}; load average (1/5/15 min) {load_average()} at start"
    print(machine_line, flush=True)
    torch.manual_seed(0)
    net = edsr_baseline(args.scale) if args.model == "baseline" else EDSR(1, 8, args.scale)
    bodies = make_inputs(args.size)
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        weights = save_model(net, Path(tmp) / "model.pt")
        ray.init(
            address="local",
            num_cpus=os.cpu_count(),
            num_gpus=1 if args.device == "cuda" else 0,
            object_store_memory=512 * 2**20,
            include_dashboard=False,
        )
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            base = {
                "models": {"edsr": weights},
                "num_gpus": 1 if args.device == "cuda" else 0,
                # Logical CPUs: on a small machine the ingress, the proxy and the model share the cores anyway.
                "num_cpus": 0,
                "ingress_num_cpus": 0,
                "max_ongoing_requests": max(args.batch, args.concurrency),
                "ingress_max_ongoing_requests": 2 * args.concurrency,
                "batch_max_pixels": args.size * args.size,
                "max_pixels": args.size * args.size,
            }
            modes = {
                "batched": {**base, "max_batch_size": args.batch, "batch_wait_timeout_s": args.batch_wait},
                "unbatched": {**base, "max_batch_size": 1},
            }
            outcomes = []
            for mode in args.modes.split(","):
                print(f"running {mode} ...", flush=True)
                outcome = run_mode(mode, modes[mode], f"http://127.0.0.1:{port}", bodies, args)
                for example in outcome.error_examples:
                    print(f"  error: {example}")
                outcomes.append(outcome)
        finally:
            serve.shutdown()
            ray.shutdown()
    text = report(outcomes, args, machine_line)
    print(text)
    if not args.no_write:
        append_results(text)


if __name__ == "__main__":
    main()
