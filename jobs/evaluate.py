"""Evaluate super-resolution models on benchmark sets: the paper's PSNR/SSIM table, by command.

    python jobs/evaluate.py --model bicubic --model s3://edsr/weights/edsr_x2.pt --model EDSR=models:/edsr-x4/3 \\
        --dataset s3://edsr/sets [--sets Set5 Set14 B100 Urban100 DIV2K_valid] --scale 2 3 4 \\
        [--self-ensemble [only]] --output s3://edsr/eval/table3 [--tracking-uri URI]

--model    [LABEL=]SOURCE, repeatable: a weights file (official .pt or project checkpoint), a Ray checkpoint folder,
           an s3:// URI, models:/name/version, or `bicubic` (the MATLAB-bicubic baseline). The label is the column;
           models of different scales may share one (EDSR=edsr_x2.pt EDSR=edsr_x3.pt EDSR=edsr_x4.pt).
--dataset  repeatable: an ingested root (manifest.parquet), the same layout without a manifest, one set folder
           (HR/ + LR_bicubic/X<s>/), or any folder of HR images (LR made with MATLAB-bicubic imresize). --sets picks
           sets by name (default: every set found, training splits left out).

Writes results.md (the table), results.csv and results.json (per image), failures.csv (if any) and, on request, SR
images and worst/best picture grids under --output, and logs them to MLflow when --tracking-uri or
MLFLOW_TRACKING_URI is set. Runs on Ray Data (GPU actors when the cluster has GPUs; RAY_ADDRESS selects a cluster),
or in this process with --local.

Exit status as every command (README, "Exit status"): 1 when some images failed while being evaluated (each listed
with its reason; they are left out of the means and their cells marked *); checked before anything is computed, as
bad input (2), are unknown sets, missing LR partners, LR sizes in the manifest other than HR / scale, models that do
not load and bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys

from edsr_ray import cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="[LABEL=]SOURCE or bicubic (repeatable)")
    parser.add_argument("--dataset", action="append", required=True, help="dataset root or folder (repeatable)")
    parser.add_argument("--sets", nargs="+", default=[], help="set names to evaluate (default: all found)")
    parser.add_argument("--scale", nargs="+", type=int, default=[], help="scales (default: the models' scales)")
    parser.add_argument(
        "--self-ensemble",
        nargs="?",
        const="both",
        default="off",
        choices=["both", "only"],
        help="add x8 self-ensemble columns (NAME+); `only` evaluates just those",
    )
    parser.add_argument("--output", required=True, help="output folder or s3:// prefix")
    parser.add_argument("--protocol", default="auto", choices=["auto", "benchmark", "div2k"])
    parser.add_argument("--tile", type=int, default=None, help="LR tile side (default: whole images when they fit)")
    parser.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--limit", type=int, default=None, help="first N images of each set (quick checks)")
    parser.add_argument("--save-images", action="store_true", help="write SR images under OUTPUT/images/")
    parser.add_argument("--grid", type=int, default=0, metavar="K", help="picture grid of the K worst and best images")
    parser.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI for the run and models:/ sources (default: env)"
    )
    parser.add_argument("--experiment", default="edsr-ray-eval", help="MLflow experiment")
    parser.add_argument("--workers", type=int, default=None, help="actors (default: one per GPU, else per CPU)")
    parser.add_argument("--local", action="store_true", help="evaluate in this process, without Ray")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tracking_uri:
        # The same server resolves models:/ and runs:/ sources (edsr_ray.weights reads MLFLOW_TRACKING_URI).
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    cli.setup_logging()
    return cli.run(lambda: _evaluate(args))


def _evaluate(args: argparse.Namespace) -> int:
    from edsr_ray.evaluation.run import EvaluationOptions, evaluate

    options = EvaluationOptions(
        models=tuple(args.model),
        datasets=tuple(args.dataset),
        output=args.output,
        sets=tuple(args.sets),
        scales=tuple(args.scale),
        self_ensemble=args.self_ensemble,
        protocol=args.protocol,
        tile=args.tile,
        precision=args.precision,
        limit=args.limit,
        save_images=args.save_images,
        grid=args.grid,
        tracking_uri=args.tracking_uri,
        experiment=args.experiment,
        workers=args.workers,
        use_ray=not args.local,
    )
    report = evaluate(options)
    print(report.table)
    for failure in report.failures:
        print(
            f"failed: {failure.model} {failure.set}/{failure.image} x{failure.scale}: {failure.error}", file=sys.stderr
        )
    print(f"{len(report.results)} results, {len(report.failures)} failed, in {report.seconds:.1f} s")
    print("wrote " + ", ".join(report.files.values()))
    if report.mlflow_run_id:
        print(f"MLflow run {report.mlflow_run_id}")
    return report.exit_code


if __name__ == "__main__":
    cli.entry(main, "evaluate")
