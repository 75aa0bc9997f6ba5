"""Training samples/s end to end (embedded S3 → Ray Data patch stream → Ray Train, 1 worker) next to the same model,
batch and update fed from synthetic tensors, in one run: the ratio shows whether the data pipeline starves the model.

    python benchmarks/bench_train.py [--model baseline|paper|tiny] [--batch 16] [--steps 8] [--device cpu|cuda]
        [--compile] [--cpus-per-worker N] [--no-write]

Starts the embedded S3 server and a local Ray, writes the quickstart's DIV2K-layout sample set (real photos shipped
with scikit-image), ingests it with LR x2 (the real ingest), then measures, with the model of
``configs/edsr_baseline_x2.yaml`` / ``edsr_x2.yaml`` (paper) / ``quickstart.yaml`` (tiny):

* end to end: the project's trainer (:func:`edsr_ray.training.run.run_training`: one Ray Train worker fed by the patch
  stream, MLflow logging, a checkpoint at the end) for ``2 x steps`` updates; the figure is the trainer's own
  ``patches_per_s`` of the second ``steps`` updates (the first ones absorb start-up: pipeline, allocator, compile);
* synthetic: a Ray Train worker with the same resources building the same model the same way (``prepare_model``,
  bf16 autocast + channels_last on a GPU, ``torch.compile`` with ``--compile``) and running the same
  :class:`~edsr_ray.training.update.UpdateStep` on random tensors already on the device, ``steps`` timed updates after
  ``steps`` warm-up ones. Like the trainer it keeps the losses on the device and reads them back once per window.
  It runs before and after the end-to-end run; the ratio is taken to their mean, and their difference shows how much
  the machine's load moved.

One epoch holds every update, so no epoch boundary falls inside the timed window. On a CPU each worker computes with
``cpus_per_worker`` threads (Ray sets ``OMP_NUM_THREADS`` from the worker's CPUs), and Ray Data decodes and cuts
patches on the remaining cores. Targets on one H200 (issue C): baseline >= 5500 samples/s at batch 16 end to end, the
paper model >= 850, end to end >= 0.9x synthetic. A section is appended to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _machine import append_results, load_average, machine

REPO = Path(__file__).resolve().parents[1]
MODEL_CONFIGS = {
    "baseline": REPO / "configs" / "edsr_baseline_x2.yaml",
    "paper": REPO / "configs" / "edsr_x2.yaml",
    "tiny": REPO / "configs" / "quickstart.yaml",
}
BUCKET = "edsr"
ROOT = f"s3://{BUCKET}/bench-train/div2k"
TARGET_RATIO = 0.9

log = logging.getLogger("bench_train")


def bench_config(args: argparse.Namespace, tracking_uri: str) -> Any:
    """The model's project config with data, schedule, workers, run and tracking set for the measurement."""
    from edsr_ray.config import load_config

    base = load_config(MODEL_CONFIGS[args.model])
    total = 2 * args.steps
    per_image = base.data.patches_per_image
    # One epoch covers every update of the run (rounded up to whole images).
    epoch = math.ceil(total * args.batch / per_image) * per_image
    overrides = [
        f"data.root={ROOT}",
        "data.train_range=[1, 800]",
        "data.val_range=[801, 900]",
        f"data.epoch_patches={epoch}",
        "data.val_max_size=96",  # the one validation at the end is outside the timed window; keep it short
        f"train.batch_size={args.batch}",
        f"train.total_steps={total}",
        f"train.log_every={args.steps}",
        f"train.val_every={total}",
        f"train.compile={str(args.compile).lower()}",
        "workers.num_workers=1",
        f"workers.use_gpu={str(args.device == 'cuda').lower()}",
        f"workers.cpus_per_worker={args.cpus_per_worker}",
        f"run.name=bench-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}",
        f"run.storage_path=s3://{BUCKET}/bench-train/runs",
        "run.max_failures=0",
        "tracking.experiment=bench-train",
        "tracking.registered_model=null",
        "tracking.log_images=false",
        f"tracking.tracking_uri={tracking_uri}",
    ]
    return load_config(MODEL_CONFIGS[args.model], overrides)


def synthetic_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker: the trainer's model set-up and update on random tensors; returns samples/s."""
    import ray.train
    import ray.train.torch
    import torch

    from edsr_ray.config import ExperimentConfig, from_dict
    from edsr_ray.models import build_model
    from edsr_ray.training.loop import prepare_for_training
    from edsr_ray.training.update import LossWindow

    cfg = from_dict(ExperimentConfig, loop_config["config"])
    steps, batch, scale = loop_config["steps"], cfg.train.batch_size, cfg.model.scales[0]
    device = ray.train.torch.get_device()
    torch.manual_seed(0)
    # The trainer's own set-up (edsr_ray.training.loop.train_loop_per_worker calls the same function).
    _, update, channels_last = prepare_for_training(build_model(cfg.model), cfg, device, world_size=1)
    losses = LossWindow(steps, device)
    p = cfg.data.patch_size
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    lr = (torch.rand(batch, 3, p, p, device=device) * 255).contiguous(memory_format=memory_format)  # (B, 3, P, P)
    hr = (torch.rand(batch, 3, p * scale, p * scale, device=device) * 255).contiguous(memory_format=memory_format)

    def run(n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(n):
            losses.add(update(lr, hr, scale))
        losses.check()  # the trainer's read-back, once per window
        return time.perf_counter() - start

    run(steps)  # warm-up
    seconds = run(steps)
    return {"samples_per_s": steps * batch / seconds, "threads": torch.get_num_threads(), "device": str(device)}


def run_synthetic(cfg: Any, steps: int) -> dict[str, Any]:
    import ray.train
    from ray.train.torch import TorchTrainer

    from edsr_ray.config import to_dict

    workers = cfg.workers
    resources = {"CPU": workers.cpus_per_worker, **({"GPU": 1} if workers.use_gpu else {})}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as storage:
        trainer = TorchTrainer(
            synthetic_loop,
            train_loop_config={"config": to_dict(cfg), "steps": steps},
            scaling_config=ray.train.ScalingConfig(
                num_workers=1, use_gpu=workers.use_gpu, resources_per_worker=resources
            ),
            run_config=ray.train.RunConfig(name="synthetic", storage_path=storage),
        )
        return trainer.fit().return_value


def run_end_to_end(cfg: Any, steps: int) -> float:
    """The trainer's ``patches_per_s`` over updates ``steps + 1 .. 2 * steps``, read back from MLflow."""
    from edsr_ray import tracking
    from edsr_ray.training.run import run_training

    outcome = run_training(cfg, source=f"benchmarks/bench_train.py ({cfg.model.n_resblocks} blocks)")
    if outcome.steps != 2 * steps:
        raise SystemExit(f"the end-to-end run stopped after {outcome.steps} of {2 * steps} updates")
    client = tracking.mlflow_module().MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    history = {m.step: m.value for m in client.get_metric_history(outcome.mlflow_run_id, "patches_per_s")}
    return history[2 * steps]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODEL_CONFIGS), default="baseline")
    parser.add_argument("--batch", type=int, default=16, help="global batch (1 worker: all of it)")
    parser.add_argument("--steps", type=int, default=None, help="timed updates (default: 8 on CPU, 200 on GPU)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--compile", action="store_true", help="train.compile (CUDA graphs on one GPU)")
    parser.add_argument(
        "--cpus-per-worker", type=float, default=None, help="CPUs of the train worker (default: half the cores, >= 1)"
    )
    parser.add_argument("--work-dir", default=None, help="S3 data, MLflow store (default: a temporary folder)")
    parser.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    import ray
    import torch

    from edsr_ray.infra.objectstore import EmbeddedS3
    from edsr_ray.ingest import ingest
    from edsr_ray.quickstart import build_sample_set

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible to PyTorch on this machine")
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    args.steps = args.steps or (200 if args.device == "cuda" else 8)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    cores = os.cpu_count() or 1
    args.cpus_per_worker = args.cpus_per_worker or max(1, cores // 2)
    machine_line = machine(args.device)
    load_before = load_average()
    print(machine_line, flush=True)

    with tempfile.TemporaryDirectory(prefix="edsr-bench-train-") as tmp:
        work = Path(args.work_dir).expanduser().absolute() if args.work_dir else Path(tmp)
        build_sample_set(work / "samples")
        tracking_uri = f"sqlite:///{work / 'mlflow' / 'mlflow.db'}"
        cfg = bench_config(args, tracking_uri)
        with EmbeddedS3(work / "s3", buckets=(BUCKET,)) as server:
            os.environ.update(server.env())  # before Ray starts, so its workers reach the server too
            ray.init(
                address="local",
                num_cpus=max(cores, math.ceil(args.cpus_per_worker) + 1),
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": {"MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0"}},
            )
            try:
                report = ingest([str(work / "samples")], ROOT, scales=(2,), progress=False)
                log.info("%s", report.summary().replace("\n", " |"))
                # Synthetic before and after the end-to-end run: on a shared machine the load may change meanwhile,
                # and the two synthetic figures show by how much.
                log.info("synthetic: %d warm-up + %d timed updates", args.steps, args.steps)
                before = run_synthetic(cfg, args.steps)
                log.info("end to end: %d updates, the last %d timed", 2 * args.steps, args.steps)
                end_to_end = run_end_to_end(cfg, args.steps)
                log.info("synthetic again")
                after = run_synthetic(cfg, args.steps)
            finally:
                ray.shutdown()

    synthetic = (before["samples_per_s"] + after["samples_per_s"]) / 2
    drift = abs(before["samples_per_s"] - after["samples_per_s"]) / synthetic
    ratio = end_to_end / synthetic
    m = cfg.model
    precision = "bf16 autocast + channels_last" if args.device == "cuda" else "fp32"
    verdict = "keeps up with" if ratio >= TARGET_RATIO else "starves"
    text = "\n".join(
        [
            f"## bench_train.py — {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
            "",
            f"Machine: {machine_line}; load average (1/5/15 min) {load_before} before, {load_average()} after  ",
            f"Model: {args.model} (EDSR {m.n_resblocks} blocks, {m.n_feats} features, x{m.scales[0]}), batch "
            f"{args.batch} of {cfg.data.patch_size} px LR patches, {precision}"
            f"{', torch.compile' if args.compile else ''}; 1 Ray Train worker on {before['device']} with "
            f"{args.cpus_per_worker:g} CPUs ({before['threads']} torch threads); {args.steps} timed updates per "
            "figure; data: the quickstart's 6 training photos on the embedded S3 server, LR x2.",
            "",
            "| feed | samples/s | × synthetic (mean) |",
            "|---|---:|---:|",
            f"| synthetic tensors on the device, before (same worker set-up, same UpdateStep) | "
            f"{before['samples_per_s']:.2f} | {before['samples_per_s'] / synthetic:.2f} |",
            f"| end to end: S3 → Ray Data patch stream → Ray Train (run_training) | {end_to_end:.2f} | {ratio:.2f} |",
            f"| synthetic tensors on the device, after | {after['samples_per_s']:.2f} | "
            f"{after['samples_per_s'] / synthetic:.2f} |",
            "",
            f"The pipeline {verdict} the model here (end to end / synthetic = {ratio:.2f}; target >= {TARGET_RATIO}); "
            f"the two synthetic figures differ by {drift:.0%}, the noise of this measurement.",
            "",
        ]
    )
    print(text)
    if not args.no_write:
        append_results(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
