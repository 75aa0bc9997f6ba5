"""What every benchmark records beside its figures: the machine it ran on, and where the results go.

Benchmarks import this as a sibling module (``python benchmarks/bench_X.py`` puts this folder on ``sys.path``).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

RESULTS = Path(__file__).parent / "RESULTS.md"
HEADER = "# Benchmark results\n\nAppended by the scripts in this folder; each section names the machine it ran on.\n"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def memory_gib() -> float | None:
    try:
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return None
    return kib / 2**20


def load_average() -> str:
    """1/5/15-minute load averages: a shared machine's load changes every figure measured on it."""
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine(device: str = "cpu") -> str:
    """One line: CPU, cores, memory, OS, Python, torch, Ray and the GPU used (``device="cuda"``)."""
    import ray
    import torch

    mem = memory_gib()
    parts = [
        f"{cpu_name()}, {os.cpu_count()} cores" + (f", {mem:.0f} GiB RAM" if mem else ""),
        f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
        f"torch {torch.__version__}, ray {ray.__version__}",
        f"GPU {torch.cuda.get_device_name(0)}" if device.startswith("cuda") else "CPU only",
    ]
    return "; ".join(parts)


def append_results(text: str) -> None:
    """Append a section (markdown starting with a ``##`` title) to ``benchmarks/RESULTS.md``."""
    existing = RESULTS.read_text() if RESULTS.exists() else HEADER
    RESULTS.write_text(existing.rstrip("\n") + "\n\n" + text.strip("\n") + "\n")
