"""The batch upscaling job's driver: plan the work, stream it through the three stages, report.

``jobs/upscale.py`` is a thin command over :func:`run_upscale`. A run:

1. loads the model once on the driver (a bad ``--model`` or ``--scale`` fails here, before any image is touched),
2. lists the inputs and, in one listing, the outputs that exist already (:mod:`edsr_ray.batch.inputs`): those inputs
   are ``skipped``, so a re-run of a killed job does only what is missing,
3. streams the rest through the stages of :mod:`edsr_ray.batch.stages` — on Ray Data (read + decode as CPU tasks → a
   model actor pool, ``ActorPoolStrategy(1, N)``, one GPU per actor when GPUs are used, the weights shipped once
   through the object store → encode + write as CPU tasks), or in this process with ``local`` —
4. writes ``_manifest.parquet`` and ``_summary.json`` next to the outputs and returns a
   :class:`~edsr_ray.batch.reports.Summary` (the summary line and the exit status).

Videos go through the same stages and the same model actors, as segments decoded in parallel and parts of a few
frames each (:mod:`edsr_ray.batch.video`); the driver joins each video once its parts are written, in a Ray task (or
in this process with ``local``) while the pipeline goes on.

Progress: a bar with images/s (and frames/s when there are videos) on a terminal, otherwise a log line every
:data:`PROGRESS_EVERY_S` seconds (what ``ray job logs`` shows).

Why the pipeline is shaped this way (``benchmarks/bench_upscale.py``; figures in ``benchmarks/RESULTS.md``): per
image, codecs can cost more than a GPU's forward pass, so they run as separate CPU tasks on every spare core while the
actors only feed the model. PNGs are decoded with libspng and 8-bit ones written with fpng, fast enough that the spare
cores of a GPU node keep up with the GPU, where Pillow's default PNG encoder would cap the node far below it; JPEG
costs about as little, so encoding it on the GPU would not raise a one-GPU node's rate and is not done. CPU-only
model actors run with glibc settings that keep freed memory in the process (:data:`CPU_ACTOR_ENV`), which makes their
forward passes markedly faster.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from edsr_ray import storage
from edsr_ray.batch.inputs import (
    Task,
    absolute,
    existing_outputs,
    plan_tasks,
    remove_stale_temp_files,
    video_container,
)
from edsr_ray.batch.reports import (
    IGNORED_EXAMPLES,
    LOGGED_FAILURES,
    MANIFEST_NAME,
    SUMMARY_NAME,
    Summary,
    write_reports,
)
from edsr_ray.batch.stages import (
    MANIFEST_SCHEMA,
    CodecOptions,
    UpscaleBatch,
    decode_batch,
    decode_segments,
    manifest_table,
    tasks_table,
    write_batch,
)
from edsr_ray.batch.video import VideoJoins, join_video, manifest_row
from edsr_ray.config import InferenceConfig, to_dict
from edsr_ray.errors import ConfigError, EdsrRayError, Interrupted, StorageError
from edsr_ray.infra.ray import ensure_ray
from edsr_ray.outsize import OutputSize
from edsr_ray.storage import StorageConfig
from edsr_ray.video import VideoOptions
from edsr_ray.video import to_dict as video_to_dict

logger = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0
# Images per model call: GPUs want several same-size images per forward; on CPU a forward is compute-bound anyway.
GPU_BATCH = 16
CPU_BATCH = 4
# Images per read/decode and per encode/write call (their I/O overlaps within a call).
CODEC_BATCH = 8
# Task rows per input block: small runs get one row a block (every core busy), huge ones fewer, larger blocks.
MAX_ROWS_PER_BLOCK = 64
# Rows per model call in runs with videos: a video part row holds up to VideoOptions.part_bytes of frames, so an
# actor holds few of them at once (the frames inside still form full batches for the model).
VIDEO_ROW_BATCH = 2
# Memory a video-decoding task reserves: it holds a part or two of decoded frames and a decoder. (It must differ from
# the first stage's request too: Ray Data fuses stages with equal requests, and a fused task would decode all
# segments of a video one after the other.)
DECODE_MEMORY = 1 << 30
# Keep freed memory in CPU workers instead of unmapping every large block: each activation of a CPU forward is a new
# mmap whose pages the kernel must zero, a large part of a plain forward's time (benchmarks/RESULTS.md). One arena:
# Ray Data calls the model in a worker thread, whose own malloc arena ignores these settings for large blocks; without
# it the actor's forwards stay slow (benchmarks/bench_upscale.py).
CPU_ACTOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 << 30), "MALLOC_ARENA_MAX": "1"}


class UpscaleInterrupted(Interrupted):
    """The pipeline stopped part-way (a cluster or storage failure); outputs written so far are complete and kept.

    ``summary`` describes what was done (its manifest and summary files are written).
    """

    def __init__(self, message: str, summary: Summary):
        super().__init__(message)
        self.summary = summary


@dataclass(frozen=True)
class ComputeOptions:
    """Where the model runs.

    ``local``: everything in this process (no Ray). ``gpus``: model actors with one GPU each (default: every GPU of
    the cluster; 0: CPU actors; with ``local``, 0 forces the CPU). ``workers``: at most this many model actors
    (default: one per GPU, else the cluster's CPUs minus one). ``batch_size``: images per model call (default 16 on
    GPU, 4 on CPU).
    """

    local: bool = False
    gpus: int | None = None
    workers: int | None = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("gpus", "workers", "batch_size"):
            value = getattr(self, name)
            minimum = 0 if name == "gpus" else 1
            if value is not None and value < minimum:
                raise ConfigError(f"{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class ModelWorkers:
    """The model stage's actor pool: how many actors, what each holds, and how it computes."""

    actors: int
    batch_size: int
    device: str | None  # "cpu", or None for CUDA
    threads: int | None  # torch threads per CPU actor
    remote_args: dict[str, Any] = field(default_factory=dict)  # num_gpus / num_cpus / runtime_env of each actor
    codec_cpus: float = 1.0  # CPUs each read/decode and encode/write task reserves


def model_workers(resources: Mapping[str, float], compute: ComputeOptions) -> ModelWorkers:
    """The actor pool for a cluster with ``resources`` (``ray.cluster_resources()``)."""
    cluster_gpus = int(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 1))
    gpus = cluster_gpus if compute.gpus is None else compute.gpus
    if gpus >= 1:
        if gpus > cluster_gpus:
            logger.warning("%d GPU(s) asked for, the cluster has %d now: waiting for more to join", gpus, cluster_gpus)
        actors = min(compute.workers or gpus, gpus)
        args = {"num_gpus": 1, "num_cpus": 1}
        return ModelWorkers(actors, compute.batch_size or GPU_BATCH, None, None, args)
    # On a tiny cluster an actor holding a whole CPU would leave nothing for the codec tasks, and the run would stall.
    share = 1.0 if cpus >= 2 else 0.5
    actors = compute.workers or max(1, int(cpus) - 1)
    args = {"num_cpus": share, "runtime_env": {"env_vars": dict(CPU_ACTOR_ENV)}}
    return ModelWorkers(actors, compute.batch_size or CPU_BATCH, "cpu", 1, args, codec_cpus=share)


# --------------------------------------------------------------------------------------------------------------------
# Progress


class Progress:
    """Inputs done out of ``total``: a tqdm bar with img/s on a terminal, else a log line every ``every_s`` seconds;
    with videos, their frames too (done out of a total that grows as videos are inspected, frames/s and the time
    left at that rate).

    Failures are logged as they arrive (the first :data:`LOGGED_FAILURES`; all are in the manifest).
    """

    def __init__(self, total: int, *, bar: bool | None = None, every_s: float = PROGRESS_EVERY_S):
        self.total, self.every_s = total, every_s
        self.done = self.failed = 0
        self.frames_done = self.frames_total = 0
        self.start = self.last = time.perf_counter()
        if bar is None:
            bar = sys.stderr.isatty()
        self.bar = None
        if bar and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc="upscale", file=sys.stderr, dynamic_ncols=True)

    def update(self, rows: pa.Table) -> None:
        failed = rows.filter(pc.equal(rows.column("status"), "failed"))
        for row in failed.select(["input", "reason"]).to_pylist():
            self.failed += 1
            if self.failed <= LOGGED_FAILURES:
                logger.warning("failed: %s", row["reason"])
            elif self.failed == LOGGED_FAILURES + 1:
                logger.warning("more inputs failed; further failures are only recorded in %s", MANIFEST_NAME)
        self.done += rows.num_rows
        self._show(rows.num_rows)

    def frames(self, done: int, total: int) -> None:
        """Video frames upscaled so far, out of those of the videos inspected so far."""
        self.frames_done, self.frames_total = done, total
        self._show(0)

    def _show(self, files: int) -> None:
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(files)
            extra = {"frames": f"{self.frames_done}/{self.frames_total}"} if self.frames_total else {}
            self.bar.set_postfix(failed=self.failed, **extra, refresh=False)
        elif now - self.last >= self.every_s:
            self.last = now
            logger.info("progress: %s", self.text(now))

    def text(self, now: float | None = None) -> str:
        elapsed = (now or time.perf_counter()) - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else math.inf
        eta = "unknown" if math.isinf(left) else str(datetime.timedelta(seconds=round(left)))
        share = 100.0 * self.done / self.total if self.total else 100.0
        text = f"{self.done}/{self.total} inputs ({share:.1f}%), {rate:.2f} inputs/s, {self.failed} failed, {eta} left"
        if self.frames_total:
            fps = self.frames_done / elapsed if elapsed > 0 else 0.0
            left = (self.frames_total - self.frames_done) / fps if fps > 0 else math.inf
            eta = "unknown" if math.isinf(left) else str(datetime.timedelta(seconds=round(left)))
            text += f"; video frames {self.frames_done}/{self.frames_total}, {fps:.2f} frames/s, {eta} left"
        return text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------------------------------
# Running the stages


@dataclass(frozen=True)
class _Work:
    """What every stage needs, in plain data (it crosses the Ray boundary)."""

    scale: int
    scales: tuple[int, ...]  # the model scales each image's own is chosen from (one, unless a size is asked for)
    size: dict[str, Any]  # the OutputSize asked for
    inference: dict[str, Any]
    options: dict[str, Any]
    output_uri: str
    storage_config: dict[str, Any] | None
    video: dict[str, Any] = field(default_factory=dict)
    model_identity: str = ""
    has_videos: bool = False

    def decode_kwargs(self) -> dict[str, Any]:
        return {
            "max_pixels": int(self.options["max_pixels"]),
            "storage_config": self.storage_config,
            "scale": self.scale,
            "fmt": self.options["fmt"],
            "size": self.size,
            "scales": self.scales,
            "video": self.video,
            "model_identity": self.model_identity,
        }


def _local_stream(tasks: list[Task], stage: UpscaleBatch, work: _Work, compute: ComputeOptions) -> Iterator[pa.Table]:
    """The stages in this process, batch by batch (a video part by part)."""
    size = _local_batch(stage, compute)
    for start in range(0, len(tasks), size):
        decoded = decode_batch(tasks_table(tasks[start : start + size]), **work.decode_kwargs())
        for rows in decode_segments(decoded, video=work.video, storage_config=work.storage_config):
            upscaled = stage(rows)
            del rows  # the inputs' pixels are no longer needed
            yield write_batch(
                upscaled, output_uri=work.output_uri, options=work.options, storage_config=work.storage_config
            )


def _local_batch(stage: UpscaleBatch, compute: ComputeOptions) -> int:
    """Images (and video frames) per model call in an in-process run."""
    return compute.batch_size or (CPU_BATCH if stage.upscaler.device.type == "cpu" else GPU_BATCH)


@contextlib.contextmanager
def _data_context() -> Iterator[Any]:
    """Ray Data settings for one run, restored afterwards: our own progress replaces Ray Data's bars."""
    import ray

    ctx = ray.data.DataContext.get_current()
    before = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    try:
        yield ctx
    finally:
        ctx.enable_progress_bars = before


def _ray_stream(tasks: list[Task], model: Any, work: _Work, compute: ComputeOptions) -> Iterator[pa.Table]:
    """The three stages as one streaming Ray Data pipeline; yields manifest rows as outputs are written."""
    import ray

    from edsr_ray.weights import model_checkpoint

    resources = ray.cluster_resources()
    plan = model_workers(resources, compute)
    cpus = max(1, int(resources.get("CPU", 1)))
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    local_paths = not storage.is_s3(work.output_uri) or any(not storage.is_s3(t.source) for t in tasks)
    if nodes > 1 and local_paths:
        logger.warning("local paths on a %d-node cluster: they must be visible on every node (or use s3://)", nodes)
    logger.info(
        "%d images; %d model actor(s) %s, batches of %d", len(tasks), plan.actors, plan.remote_args, plan.batch_size
    )
    # Weights go to the object store once; every actor reads them from there, not from the model's source (which
    # the workers may not reach, e.g. an MLflow server only the driver sees).
    checkpoint = ray.put(model_checkpoint(model))
    per_block = max(1, min(MAX_ROWS_PER_BLOCK, len(tasks) // (4 * cpus)))
    table = tasks_table(tasks)
    blocks = [table.slice(i, per_block) for i in range(0, table.num_rows, per_block)]
    codec = {"num_cpus": plan.codec_cpus, "batch_format": "pyarrow", "batch_size": CODEC_BATCH}
    with _data_context():
        ds = ray.data.from_arrow(blocks)
        # Without videos by name there is no segment stage: a video named like an image fails with the reason.
        decode_kwargs = {**work.decode_kwargs(), "video": work.video if work.has_videos else None}
        ds = ds.map_batches(decode_batch, fn_kwargs=decode_kwargs, **codec)
        if work.has_videos:
            # One row a block: the segments of one video, emitted together, would otherwise be decoded by one task.
            ds = ds.repartition(target_num_rows_per_block=1)
            ds = ds.map_batches(
                decode_segments,
                fn_kwargs={"video": work.video, "storage_config": work.storage_config},
                num_cpus=plan.codec_cpus,
                memory=DECODE_MEMORY,
                batch_format="pyarrow",
                batch_size=1,
            )
        ds = ds.map_batches(
            UpscaleBatch,
            fn_constructor_args=([checkpoint], work.scale, work.inference),
            fn_constructor_kwargs={"device": plan.device, "threads": plan.threads, "frame_batch": plan.batch_size},
            batch_format="pyarrow",
            batch_size=VIDEO_ROW_BATCH if work.has_videos else plan.batch_size,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.actors),
            **plan.remote_args,
        )
        ds = ds.map_batches(
            write_batch,
            fn_kwargs={
                "output_uri": work.output_uri,
                "options": work.options,
                "storage_config": work.storage_config,
            },
            **codec,
        )
        yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)


def run_upscale(
    model_source: str,
    input_uri: str,
    output_uri: str,
    *,
    scale: int | None = None,
    size: OutputSize | None = None,
    inference: InferenceConfig | None = None,
    options: CodecOptions | None = None,
    video: VideoOptions | None = None,
    compute: ComputeOptions | None = None,
    allow_failures: int = 0,
    progress: bool | None = None,
    on_rows: Callable[[pa.Table], None] | None = None,
    cfg: StorageConfig | None = None,
) -> Summary:
    """Upscale every input of ``input_uri`` into ``output_uri`` with the model at ``model_source``.

    Errors that make the whole run impossible (model missing or not EDSR/MDSR, scale not served by the model, input
    location missing, bad options) are raised before any image is touched. Per-image problems end up in the manifest.
    A pipeline that stops part-way (cluster or storage failure) still writes the manifest of what was done and
    raises :class:`UpscaleInterrupted`. ``video``: how videos are written and their limits (default
    :class:`~edsr_ray.video.VideoOptions`). ``progress``: the bar on (True) or off (False); None: on a terminal only.
    ``on_rows`` is called with each batch of manifest rows as their outputs are written (monitoring, benchmarks).

    ``size`` (``--outscale``/``--width``/``--height``) asks for a final size instead of the model's factor: each image
    is upscaled by the smallest model scale that covers it (among ``scale``, else all the model's scales), then
    resized to it in the encode stage (:mod:`edsr_ray.outsize`).
    """
    from edsr_ray.inference import model_scales, resolve_scale
    from edsr_ray.weights import load_model

    started = time.perf_counter()
    inference = inference or InferenceConfig()
    options = options or CodecOptions()
    video = video or VideoOptions()
    compute = compute or ComputeOptions()
    if allow_failures < 0:
        raise ConfigError(f"allow_failures must be >= 0, got {allow_failures}")
    # Every location is checked before anything is read or written: a gs:// output never becomes a local "gs:" folder.
    if isinstance(model_source, str):
        storage.location_kind(model_source, storage.MODEL_LOCATIONS, what="--model")
    input_uri = absolute(str(input_uri), what="--input")
    output_uri = absolute(str(output_uri), what="--output").rstrip("/")
    if not storage.is_s3(output_uri) and os.path.exists(output_uri) and not os.path.isdir(output_uri):
        raise StorageError(f"--output {output_uri} is a file; expected a folder (created when missing)")
    model = load_model(model_source, storage=cfg)
    size = size or OutputSize()
    if size.asked and scale is None:  # each image gets the smallest of the model's scales that covers its size
        scales = tuple(sorted(model_scales(model)))
    else:
        scale = resolve_scale(model, scale)
        scales = (scale,)
    how = f"x{scale}" if not size.asked else f"{size.describe()} (model scale {'/'.join(f'x{s}' for s in scales)})"

    removed = remove_stale_temp_files(output_uri)
    if removed:
        logger.info("removed %d temporary file(s) left in %s by an interrupted run", removed, output_uri)
    tasks, refused, ignored = plan_tasks(input_uri, output_uri, options.fmt, cfg, video)
    existing = existing_outputs(output_uri, cfg)
    pending = [t for t in tasks if t.dest not in existing]
    rows = [{"input": t.source, "output": t.dest, "status": "failed", "reason": why} for t, why in refused]
    rows += [
        {"input": t.source, "output": t.dest, "status": "skipped", "reason": ""} for t in tasks if t.dest in existing
    ]
    if not tasks and not refused:
        logger.warning("no images found in %s", input_uri)
    logger.info(
        "%d inputs: %d to upscale to %s, %d skipped (output exists), %d refused",
        len(tasks) + len(refused),
        len(pending),
        how,
        len(tasks) - len(pending),
        len(refused),
    )
    for task, why in refused:
        logger.warning("failed: %s: %s", task.source, why)
    if ignored:
        examples = "; ".join(f"{source}: {why}" for source, why in ignored[:IGNORED_EXAMPLES])
        more = f"; and {len(ignored) - IGNORED_EXAMPLES} more" if len(ignored) > IGNORED_EXAMPLES else ""
        logger.info(
            "ignored %d file(s) that are not inputs (counted in %s): %s%s", len(ignored), SUMMARY_NAME, examples, more
        )

    has_videos = any(video_container(t.source) or video_container(t.dest) for t in pending)
    if size.asked and has_videos:
        example = next(t.source for t in pending if video_container(t.source) or video_container(t.dest))
        raise ConfigError(
            f"output sizes (--outscale, --width, --height) apply to images only, and the inputs hold videos (e.g. "
            f"{example}): upscale the videos in a run without a size option (they are written at the model's factor)"
        )
    work = _Work(
        scale or scales[-1],
        scales,
        to_dict(size),
        to_dict(inference),
        to_dict(options),
        output_uri,
        None if cfg is None else to_dict(cfg),
        video_to_dict(video),
        # Only videos need it (their parts' fingerprint); in-process runs also find videos named like images.
        f"{_model_identity(model)}:{scale}:{sorted(to_dict(inference).items())}" if has_videos or compute.local else "",
        has_videos,
    )
    parts = [manifest_table(rows)]
    interrupted = None
    if pending:
        if compute.local:
            # Built here, so that a device or setting this machine cannot honour fails before any image is read.
            stage = UpscaleBatch(model, work.scale, inference, device="cpu" if compute.gpus == 0 else None)
            stage.frame_batch = _local_batch(stage, compute)
            stream = _local_stream(pending, stage, work, compute)
        else:
            ensure_ray()  # before the clock starts: img/s measures the pipeline, not a cluster's start
            stream = _ray_stream(pending, model, work, compute)
    processing = time.perf_counter()
    if pending:
        bar = Progress(len(pending), bar=progress)
        joins = _Joins(work, local=compute.local)

        def report(table: pa.Table) -> None:
            parts.append(table)
            bar.update(table)
            if on_rows is not None:
                on_rows(table)

        try:
            for part in stream:
                for table in joins.take(part):
                    report(table)
                bar.frames(joins.videos.frames_done, joins.videos.frames_total)
        except (EdsrRayError, OSError) as exc:
            interrupted = str(exc)
        except Exception as exc:  # Ray's own failures (a worker lost beyond its retries, ...)
            if not _is_ray_error(exc):
                raise
            interrupted = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        finally:
            # Videos whose parts were all written are joined even when the pipeline stopped.
            with contextlib.suppress(Exception):
                for table in joins.close():
                    report(table)
            bar.close()
    seconds = time.perf_counter() - processing

    settings = {
        "model": _redact(str(model_source)),
        "scale": scale,
        "scales": list(scales),
        "output_size": to_dict(size),
        "input": input_uri,
        "output": output_uri,
        "mode": "local" if compute.local else "ray",
        "inference": to_dict(inference),
        "output_options": to_dict(options),
        "compute": to_dict(compute),
    }
    manifest = pa.concat_tables([p.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA) for p in parts])
    summary = Summary(manifest, seconds, time.perf_counter() - started, interrupted, removed, settings, ignored)
    try:
        write_reports(summary, output_uri, allow_failures, cfg)
    except StorageError as exc:
        # The images are written; only the reports are missing. A re-run skips the finished images and writes them.
        interrupted = interrupted or f"the run's reports could not be written: {exc}"
    if interrupted:
        raise UpscaleInterrupted(
            f"the run stopped after {summary.written} of {len(pending)} images: {interrupted}; outputs written so "
            "far are complete, and running the same command again does only what is missing",
            summary,
        )
    return summary


class _Joins:
    """The driver's side of videos: the write stage's rows in, manifest rows out. Image rows pass; a video is joined
    (a Ray task, or in this process with ``local``) once all its parts are written, while the pipeline goes on."""

    def __init__(self, work: _Work, *, local: bool):
        self.work, self.local = work, local
        self.videos = VideoJoins()
        self.running: list[Any] = []  # local: manifest rows; Ray: the join tasks' references
        self.requests: dict[Any, dict[str, Any]] = {}
        self.remote = None

    def take(self, rows: pa.Table) -> Iterator[pa.Table]:
        kinds = rows.column("kind").to_pylist()
        images = [i for i, kind in enumerate(kinds) if kind == "image"]
        if len(images) == rows.num_rows:
            yield rows
            return
        if images:
            yield rows.take(images)
        failed = []
        for i, kind in enumerate(kinds):
            if kind != "image":
                row = self.videos.add(rows.slice(i, 1).to_pylist()[0])
                if row is not None:
                    failed.append(row)
        if failed:
            yield manifest_table(failed)
        for request in self.videos.ready():
            self._submit(request)
        yield from self._collect(wait=False)

    def _submit(self, request: dict[str, Any]) -> None:
        args = (request, self.work.output_uri, self.work.storage_config)
        if self.local:
            self.running.append(join_video(*args))
            return
        import ray

        if self.remote is None:
            self.remote = ray.remote(num_cpus=1, max_retries=1)(join_video)
        ref = self.remote.remote(*args)
        self.requests[ref] = request
        self.running.append(ref)

    def _collect(self, *, wait: bool) -> Iterator[pa.Table]:
        if self.local:
            done, self.running = self.running, []
        else:
            import ray

            refs, self.running = self.running, []
            ready: list[Any] = []
            if refs:
                ready, self.running = ray.wait(refs, num_returns=len(refs), timeout=None if wait else 0)
            done = [self._result(ref) for ref in ready]
        if done:
            yield manifest_table(done)

    def _result(self, ref: Any) -> dict[str, Any]:
        import ray

        request = self.requests.pop(ref)
        try:
            return ray.get(ref)
        except ray.exceptions.RayError as exc:  # the join task's worker was lost beyond its retry
            row = request["row"]
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return manifest_row({**row, "reason": f"{row['input']}: joining its parts failed: {first}"}, request["job"])

    def close(self) -> Iterator[pa.Table]:
        yield from self._collect(wait=True)
        rows = self.videos.finish()
        if rows:
            yield manifest_table(rows)


def _model_identity(model: Any) -> str:
    """A digest of the model's weights: part of a video's parts fingerprint, so a re-run with other weights never
    joins parts of the old ones."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def _redact(uri: str) -> str:
    """``uri`` without the user:password part a URL may carry (reports must never hold credentials)."""
    scheme, sep, rest = uri.partition("://")
    host, slash, path = rest.partition("/")
    if sep and "@" in host:
        return f"{scheme}://<redacted>@{host.rsplit('@', 1)[1]}{slash}{path}"
    return uri


def _is_ray_error(exc: BaseException) -> bool:
    try:
        import ray.exceptions
    except ImportError:  # pragma: no cover - Ray is a dependency
        return False
    return isinstance(exc, ray.exceptions.RayError)
