"""The batch job's read stage: the bounded reads of ``edsr_ray.storage`` next to plain reads, side by side in one run.

    python benchmarks/bench_reads.py [--rounds 15] [--no-write]

Every input read goes through :func:`edsr_ray.storage.read_bytes`, which checks that a local path is a regular file
before opening it and reads at most ``max_read_bytes``, and reads an S3 body one socket read at a time so that its
size limit and time budget are checked between chunks. This measures what that costs against the plain reads it
replaced (``Path.read_bytes`` locally; boto3's ``get_object()["Body"].read()`` on S3), on photo-sized files: a
270x480 PNG (the input size of ``bench_upscale.py``), a 2K PNG (DIV2K's size) and a 20 MB file. Rounds interleave the
two ways and the medians are compared. S3 is the embedded SeaweedFS server on this machine, so network time is
nearly nil and any per-chunk overhead shows in full. A section is appended to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _machine import append_results, load_average, machine
from PIL import Image

from edsr_ray import storage
from edsr_ray.samples import photos

BUCKET = "bench"


def _png(height: int, width: int) -> bytes:
    """A photographic PNG of the given size (a real photo, resized), compressed as Pillow does by default."""
    image = Image.fromarray(photos()["astronaut"]).resize((width, height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def files() -> dict[str, bytes]:
    return {
        "270x480 PNG": _png(270, 480),
        "2040x1356 PNG": _png(1356, 2040),
        "20 MB": np.random.default_rng(0).integers(0, 256, 20 << 20, dtype=np.uint8).tobytes(),
    }


def median_ms(ways: dict[str, Callable[[], bytes]], expected: bytes, rounds: int) -> dict[str, float]:
    """Median time of each way over interleaved rounds (each read checked against the expected bytes)."""
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, read in ways.items():
            start = time.perf_counter()
            data = read()
            times[name].append(time.perf_counter() - start)
            assert data == expected, name
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds per file and way (default 15)")
    p.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = p.parse_args()

    from edsr_ray.infra.objectstore import EmbeddedS3

    machine_line = f"{machine()}; load average at start {load_average()}"
    print(machine_line, flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, EmbeddedS3(Path(tmp) / "s3", buckets=(BUCKET,)) as s3:
        os.environ.update(s3.env())
        client = storage.s3_client()
        for label, data in files().items():
            path = Path(tmp) / "input.bin"
            path.write_bytes(data)
            uri = f"s3://{BUCKET}/input.bin"
            storage.write_bytes(uri, data)
            local = median_ms(
                {"plain": path.read_bytes, "bounded": lambda p=path: storage.read_bytes(str(p))}, data, args.rounds
            )
            remote = median_ms(
                {
                    "plain": lambda: client.get_object(Bucket=BUCKET, Key="input.bin")["Body"].read(),
                    "bounded": lambda u=uri: storage.read_bytes(u),
                },
                data,
                args.rounds,
            )
            for where, ms in (("local file", local), ("S3 object", remote)):
                rows.append((label, len(data), where, ms["plain"], ms["bounded"]))
                print(f"{label} {where}: plain {ms['plain']:.3f} ms, bounded {ms['bounded']:.3f} ms", flush=True)

    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [
        f"## bench_reads.py — {now}",
        "",
        f"Machine: {machine_line}  ",
        f"Medians of {args.rounds} interleaved rounds per file; S3 is the embedded SeaweedFS on this machine.",
        "",
        "| file | bytes | where | plain read (ms) | bounded read (ms) | bounded / plain |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for label, size, where, plain, bounded in rows:
        lines.append(f"| {label} | {size:,} | {where} | {plain:.3f} | {bounded:.3f} | {bounded / plain:.2f} |")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        append_results(text)


if __name__ == "__main__":
    main()
