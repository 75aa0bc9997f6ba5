"""Training patches per second per CPU core: the Ray Data patch stream next to a naive one-decode-per-patch loop.

    python benchmarks/bench_patches.py [--images 100] [--epoch-patches 8000] [--no-write]

Starts the embedded S3 server (SeaweedFS), generates a DIV2K-sized set (default 100 images of 2040x1356 with
photographic content: tiles of the bundled photos, upscaled, with 1/f texture and sensor-like noise, saved as
zlib PNGs like DIV2K's), ingests it with LR x2 (the real ingest job), and measures in one run:

* naive: per patch, download the HR and LR objects, decode both, cut one 48x48 / 96x96 pair (one process, one core);
* stream: ``patch_dataset`` iterated by Ray Data on all cores (one decode per ``patches_per_image`` patches), raw
  blocks and through ``iter_training_batches`` (batches of 16 as float tensors, what a Ray Train worker sees);
* the trainer's side alone: ``iter_training_batches`` over materialized blocks, the CPU a training process spends
  per patch to get its batches;
* where the time of one image goes (fetch, decode, cut), to show what caching decoded images could still win.

Each figure is given per wall-clock second and per CPU-second of the benchmark's own processes (driver, Ray, the S3
server; read from /proc), the latter being the rate of one dedicated core even on a machine shared with other work.
The naive loop runs in one process, but its CPU time also counts the idle Ray and S3 processes beside it, which
lowers its per-CPU-second rate a little and so flatters the stream's ratio by as much.
Targets: stream >= 20x naive per core, and 16 cores > 6800 patches/s (an H200 training baseline x2 at batch 64 in
bf16). A section is appended to ``benchmarks/RESULTS.md``. Generated images and the S3 data are kept in
``--work-dir``, so a re-run skips the generation and the upload.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from _machine import append_results, load_average, machine  # what every benchmark here records

# Reference rates of an H200 (plain PyTorch, from the issues, not measured here): what the stream must feed.
GPU_PATCHES_PER_S = 6800  # EDSR baseline x2, bf16, batch 64: the stream's target
GPU_TRAIN_BATCH16_PER_S = 6155  # the same at batch 16 under CUDA graphs: what one training process consumes
TARGET_RATIO = 20

log = logging.getLogger("bench_patches")


def _pink_noise(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance noise with a 1/f amplitude spectrum, the falloff of natural images."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    spectrum = (rng.standard_normal((h, fx.shape[1])) + 1j * rng.standard_normal((h, fx.shape[1]))) / f
    spectrum[0, 0] = 0.0
    noise = np.fft.irfft2(spectrum, s=(h, w))
    return noise / noise.std()


def make_image(index: int, width: int, height: int) -> np.ndarray:
    """A photographic (H, W, 3) uint8 image: a 2x3 mosaic of random crops of the bundled photos, each enlarged
    1-1.6x, plus 1/f texture and per-pixel noise so it has the fine detail and PNG entropy of a 2K photo."""
    from PIL import Image

    from edsr_ray.samples import photos

    sources = list(photos().values())
    rng = np.random.default_rng(index)
    canvas = np.empty((height, width, 3), np.float32)
    ys = np.linspace(0, height, 3).astype(int)
    xs = np.linspace(0, width, 4).astype(int)
    for a in range(2):
        for b in range(3):
            th, tw = ys[a + 1] - ys[a], xs[b + 1] - xs[b]
            src = sources[rng.integers(len(sources))]
            zoom = rng.uniform(1.0, 1.6)
            ch, cw = min(src.shape[0], int(th / zoom)), min(src.shape[1], int(tw / zoom))
            y0, x0 = rng.integers(0, src.shape[0] - ch + 1), rng.integers(0, src.shape[1] - cw + 1)
            tile = np.asarray(Image.fromarray(src[y0 : y0 + ch, x0 : x0 + cw]).resize((tw, th), Image.BICUBIC))
            canvas[ys[a] : ys[a + 1], xs[b] : xs[b + 1]] = tile[:, ::-1] if rng.random() < 0.5 else tile
    canvas += _pink_noise(height, width, rng)[..., None] * 4.0 + rng.standard_normal((height, width, 3)) * 1.5
    return np.clip(canvas, 0, 255).round().astype(np.uint8)


def _write_image(args: tuple[int, int, int, str]) -> int:
    from PIL import Image

    index, width, height, path = args
    tmp = path + ".tmp"
    Image.fromarray(make_image(index, width, height)).save(tmp, "PNG")  # zlib level 6, as DIV2K's PNGs
    os.replace(tmp, path)
    return os.path.getsize(path)


def generate(folder: Path, count: int, width: int, height: int) -> list[int]:
    """Write ``DIV2K_train_HR/0001.png ...`` (kept between runs: only missing images are made)."""
    hr = folder / "DIV2K_train_HR"
    hr.mkdir(parents=True, exist_ok=True)
    jobs = [(i, width, height, str(hr / f"{i:04d}.png")) for i in range(1, count + 1)]
    todo = [j for j in jobs if not os.path.exists(j[3])]
    if todo:
        log.info("generating %d images of %dx%d in %s", len(todo), width, height, hr)
        with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
            list(pool.map(_write_image, todo))
    return [os.path.getsize(j[3]) for j in jobs]


# --------------------------------------------------------------------------------------------------------------------
# Measurements


Snapshot = dict[tuple[int, int], float]


def cpu_snapshot(root: int | None = None) -> Snapshot | None:
    """CPU seconds (user + system, all threads) used so far by this process and each of its descendants - the Ray
    processes of a local instance and the S3 server are children of this one - keyed by (pid, start time) so a
    reused pid is not mistaken for the same process. None where /proc is missing."""
    root = os.getpid() if root is None else root
    tick = os.sysconf("SC_CLK_TCK")
    parent, used = {}, {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return None
    for entry in entries:
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()  # fields from 3 (state) on; the name may contain spaces
        pid = int(entry)
        parent[pid] = int(fields[1])
        used[pid] = ((pid, int(fields[19])), (int(fields[11]) + int(fields[12])) / tick)  # starttime; utime + stime
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    out, stack = {}, [root]
    while stack:
        pid = stack.pop()
        if pid in used:
            key, seconds = used[pid]
            out[key] = seconds
        stack += children.get(pid, [])
    return out


def cpu_between(before: Snapshot | None, after: Snapshot | None) -> float | None:
    """CPU seconds used between two snapshots by the processes alive at the second one (processes that exited in
    between are left out rather than counted negative; Ray keeps its workers, so that loses little)."""
    if before is None or after is None:
        return None
    return sum(seconds - before.get(key, 0.0) for key, seconds in after.items())


@dataclass
class Rate:
    """Patches produced in ``wall_s`` seconds using ``cpu_s`` CPU seconds of our own processes on ``cores`` cores."""

    patches: int = 0
    wall_s: float = 0.0
    cpu_s: float | None = 0.0
    cores: int = 1

    @property
    def per_s(self) -> float:
        return self.patches / self.wall_s

    @property
    def per_core(self) -> float:
        return self.per_s / self.cores

    @property
    def per_cpu_s(self) -> float:
        """Patches per CPU-second: the rate of one dedicated core, independent of other load on a shared machine."""
        return self.patches / self.cpu_s if self.cpu_s else float("nan")

    @property
    def per_core_best(self) -> float:
        """Per CPU-second where the CPU time was measured, else per core of wall-clock time."""
        return self.per_cpu_s if self.cpu_s is not None else self.per_core


@contextmanager
def measure(rate: Rate) -> Iterator[Rate]:
    """Add the wall-clock and process-tree CPU time of the block to ``rate``."""
    before, t0 = cpu_snapshot(), time.perf_counter()
    yield rate
    used = cpu_between(before, cpu_snapshot())
    rate.wall_s += time.perf_counter() - t0
    rate.cpu_s = None if used is None or rate.cpu_s is None else rate.cpu_s + used


def naive_loop(images: list[tuple[str, str]], count: int, patch: int, scale: int) -> Rate:
    """Per patch: pick an image, download HR + LR, decode both, cut one aligned pair (same decoder as the stream)."""
    from edsr_ray import storage
    from edsr_ray.training import patches

    rng = np.random.default_rng(0)
    with measure(Rate(patches=count)) as rate:
        for _ in range(count):
            hr_uri, lr_uri = images[rng.integers(len(images))]
            hr = patches.decode_rgb8(storage.read_bytes(hr_uri), hr_uri)
            lr = patches.decode_rgb8(storage.read_bytes(lr_uri), lr_uri)
            patches.cut_patches(lr, hr, scale, 1, patch, rng)
    return rate


def breakdown(
    images: list[tuple[str, str]], sources: list[Path], n: int, patch: int, scale: int, per_image: int
) -> dict[str, float]:
    """Median milliseconds per image for fetching (HR + LR), decoding (HR + LR) and cutting ``per_image`` patches,
    and for decoding the HR image as stored (fpng PNG) and as its source file (zlib PNG, as DIV2K's originals)."""
    from edsr_ray import storage
    from edsr_ray.training import patches

    rng = np.random.default_rng(1)
    times: dict[str, list[float]] = {"fetch": [], "decode": [], "cut": [], "hr_stored": [], "hr_source": []}
    for (hr_uri, lr_uri), source in zip(images[:n], sources):
        original = source.read_bytes()
        t0 = time.perf_counter()
        hr_bytes, lr_bytes = storage.read_bytes(hr_uri), storage.read_bytes(lr_uri)
        t1 = time.perf_counter()
        hr, lr = patches.decode_rgb8(hr_bytes, hr_uri), patches.decode_rgb8(lr_bytes, lr_uri)
        t2 = time.perf_counter()
        patches.cut_patches(lr, hr, scale, per_image, patch, rng)
        t3 = time.perf_counter()
        patches.decode_rgb8(hr_bytes, hr_uri)
        t4 = time.perf_counter()
        patches.decode_rgb8(original, str(source))
        t5 = time.perf_counter()
        for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            times[key].append(1000 * value)
    return {k: statistics.median(v) for k, v in times.items()}


def read_task_work(cfg, scale: int, units: int) -> Rate:
    """The read tasks' own work (fetch, decode, cut, build the block) run in this process, without Ray."""
    from edsr_ray import manifest
    from edsr_ray.training import patches

    source = patches.PatchDatasource(
        patches._image_table(cfg, (scale,), "train", manifest.DIV2K, None),
        epoch_patches=cfg.epoch_patches,
        patches_per_image=cfg.patches_per_image,
        patch_size=cfg.patch_size,
        augment=cfg.augment,
        seed=0,
        storage=None,
    )
    plan = source.plan(entropy=0)[:units]
    with measure(Rate(patches=sum(u.count for u in plan))) as rate:
        for unit in plan:
            patches._read_unit(unit, cfg.patch_size, cfg.augment, None)
    return rate


def stream(cfg, scale: int, epochs: int, cores: int) -> Rate:
    """Whole epochs of raw blocks from ``patch_dataset`` (after one warm-up epoch)."""
    from edsr_ray.training import patches

    ds = patches.patch_dataset(cfg, (scale,), seed=0)
    rate = Rate(cores=cores)
    for epoch in range(epochs + 1):
        with measure(Rate()) as one:  # epoch 0 warms up workers and connections: measured, then dropped
            one.patches = sum(len(b["scale"]) for b in ds.iter_batches(batch_size=None, prefetch_batches=4))
        if epoch:
            rate.patches += one.patches
            rate.wall_s += one.wall_s
            rate.cpu_s = None if one.cpu_s is None or rate.cpu_s is None else rate.cpu_s + one.cpu_s
    return rate


def trainer_view(cfg, scale: int, batch: int, cores: int, *, materialized: bool = False) -> Rate:
    """One epoch through iter_training_batches (shuffle pool + float NCHW tensors), after a warm-up epoch.

    ``materialized``: over blocks already in Ray's object store, so no read task runs while it is measured and the
    CPU time is what a Ray Train worker spends between updates to get its next batch (block fetch, shuffle pool,
    tensor conversion): the share of a core the model's process loses.
    """
    from edsr_ray.training import batches, patches

    ds = patches.patch_dataset(cfg, (scale,), seed=2 if materialized else 1)
    if materialized:
        ds = ds.materialize()
    for _ in batches.iter_training_batches(ds, batch, (scale,)):
        pass
    with measure(Rate(cores=cores)) as rate:
        rate.patches = sum(lr.shape[0] for lr, _, _ in batches.iter_training_batches(ds, batch, (scale,)))
    return rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--width", type=int, default=2040)
    parser.add_argument("--height", type=int, default=1356)
    parser.add_argument("--epoch-patches", type=int, default=8000)
    parser.add_argument("--epochs", type=int, default=2, help="measured epochs of the stream (after a warm-up)")
    parser.add_argument("--patch-size", type=int, default=48)
    parser.add_argument("--patches-per-image", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--naive-patches", type=int, default=60)
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "edsr-bench-patches"))
    parser.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray

    from edsr_ray import manifest, storage
    from edsr_ray.config import DataConfig
    from edsr_ray.infra.objectstore import EmbeddedS3
    from edsr_ray.ingest import ingest

    work = Path(args.work_dir)
    scale = 2
    sizes = generate(work / "DIV2K", args.images, args.width, args.height)
    cores = os.cpu_count() or 1
    load_before = load_average()
    with EmbeddedS3(work / "s3", buckets=("edsr",)) as server:
        os.environ.update(server.env())  # before Ray starts, so its workers reach the server too
        ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
        try:
            root = "s3://edsr/bench/div2k"
            report = ingest([str(work / "DIV2K")], root, scales=(scale,), progress=False)
            log.info("ingest: %s", report.summary().replace("\n", " |"))
            cfg = DataConfig(
                root=root,
                train_range=(1, args.images),
                patch_size=args.patch_size,
                patches_per_image=args.patches_per_image,
                epoch_patches=args.epoch_patches,
            )
            rows = manifest.select(manifest.read_manifest(root), "DIV2K", (1, args.images), scale)
            images = [
                (storage.join(root, r["hr_key"]), storage.join(root, r[f"lr_x{scale}_key"])) for _, r in rows.iterrows()
            ]

            log.info("naive loop: %d patches", args.naive_patches)
            naive = naive_loop(images, args.naive_patches, args.patch_size, scale)
            sources = [work / "DIV2K" / "DIV2K_train_HR" / f"{r['id']}.png" for _, r in rows.iterrows()]
            parts = breakdown(images, sources, min(10, len(images)), args.patch_size, scale, args.patches_per_image)
            alone = read_task_work(cfg, scale, min(20, cfg.epoch_patches // cfg.patches_per_image))
            log.info("stream: %d epochs of %d patches on %d cores", args.epochs, args.epoch_patches, cores)
            blocks = stream(cfg, scale, args.epochs, cores)
            trainer = trainer_view(cfg, scale, args.batch_size, cores)
            consumer = trainer_view(cfg, scale, args.batch_size, 1, materialized=True)
        finally:
            ray.shutdown()

    def row(name: str, r: Rate, versus_naive: bool = True) -> str:
        cpu = f"{r.cpu_s:.1f}" if r.cpu_s is not None else "n/a"
        versus = f"{r.per_cpu_s / naive.per_cpu_s:.1f}x" if versus_naive else ""  # only for rows that produce
        return (
            f"| {name} | {r.cores} | {r.patches} | {r.wall_s:.1f} | {cpu} | {r.per_s:.1f} | {r.per_core:.1f} | "
            f"{r.per_cpu_s:.1f} | {versus} |"
        )

    robust = blocks.cpu_s is not None
    per_core = blocks.per_core_best
    ratio = per_core / naive.per_core_best
    unit_ms = parts["fetch"] + parts["decode"] + parts["cut"]
    lines = [
        f"## bench_patches.py — {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "",
        f"Machine: {machine()}; S3: embedded SeaweedFS on 127.0.0.1 (same machine); load average (1/5/15 min) "
        f"{load_before} before, {load_average()} after  ",
        f"Data: {args.images} generated photographic images {args.width}x{args.height} (source PNG "
        f"{np.mean(sizes) / 1e6:.1f} MB on average) + LR x{scale}; LR patch {args.patch_size} "
        f"(HR {args.patch_size * scale}), patches_per_image {args.patches_per_image}, "
        f"epoch {args.epoch_patches} patches, Ray num_cpus {cores}.",
        "",
        "CPU s = CPU time of this benchmark's own processes (driver, Ray, S3 server) during the measurement, so "
        "'per CPU-second' is the rate of one dedicated core whatever else runs on the machine; 'per core' divides "
        "the wall-clock rate by the cores used.",
        "",
        "| method | cores | patches | wall s | CPU s | patches/s | per core | per CPU-second | vs naive |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        row("naive: download + decode HR/LR + cut one pair", naive),
        row(f"read-task work alone, no Ray (fetch + decode + cut {args.patches_per_image})", alone),
        row(f"stream: patch_dataset blocks ({args.epochs} epochs)", blocks),
        row(f"stream through iter_training_batches (batch {args.batch_size}, float NCHW)", trainer),
        row("trainer side alone: iter_training_batches over materialized blocks", consumer, versus_naive=False),
        "",
        f"One image (median of 10): fetch HR+LR {parts['fetch']:.1f} ms, decode {parts['decode']:.1f} ms, cut "
        f"{args.patches_per_image} pairs {parts['cut']:.1f} ms: decoding is {parts['decode'] / unit_ms:.0%} of the "
        f"read work, so caching decoded images could at best gain {unit_ms / (unit_ms - parts['decode']):.1f}x on it, "
        f"for {(3 * args.width * args.height * 1.25) / 1e6:.0f} MB of memory per image (HR + LR x{scale}). Decoding "
        f"the HR image as stored (fpng PNG) takes {parts['hr_stored']:.1f} ms, the zlib PNG it came from "
        f"{parts['hr_source']:.1f} ms.  ",
        f"Targets ({'per CPU-second' if robust else 'per core'}): stream >= {TARGET_RATIO}x naive: "
        f"{'met' if ratio >= TARGET_RATIO else 'NOT met'} ({ratio:.0f}x); 16 cores x {per_core:.0f} = "
        f"{16 * per_core:.0f} patches/s vs {GPU_PATCHES_PER_S} for an H200 (reference rate): "
        f"{'met' if 16 * per_core > GPU_PATCHES_PER_S else 'NOT met'}.  ",
        f"Trainer side: {consumer.per_core_best:.0f} patches per CPU-second of the training process, so batches of "
        f"{args.batch_size} at {GPU_TRAIN_BATCH16_PER_S} patches/s (the H200 reference for the baseline under CUDA "
        f"graphs, not measured here) cost it {GPU_TRAIN_BATCH16_PER_S / consumer.per_core_best:.2f} of a core.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        append_results(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
