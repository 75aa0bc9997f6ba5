"""Ingest DIV2K (or any HR image collection, or a benchmark set) into a dataset root with a manifest.

    python jobs/ingest.py --source ~/Downloads/DIV2K_train_HR.zip --source ~/Downloads/DIV2K_valid_HR.zip \\
        --dest s3://edsr/div2k
    python jobs/ingest.py --source ~/data/DIV2K --dest s3://edsr/div2k --scales 2 3 4
    python jobs/ingest.py --source ~/data/benchmark/Set5 --dataset Set5 --dest s3://edsr/div2k
    python jobs/ingest.py --source ~/photos --split train --dest /data/mine

Sources are local folders or zip files (the official DIV2K zips included); missing LR images are generated with the
MATLAB-compatible bicubic. Re-running uploads only what is missing or changed. The S3 endpoint and credentials come
from the standard AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...). Runs on the Ray cluster of the job, or
starts a local Ray.

Exit status as every command (README, "Exit status"): 1 when some images failed (the manifest still lists the good
ones).
"""

from __future__ import annotations

import argparse

from edsr_ray import cli
from edsr_ray.config import SCALES, from_dict
from edsr_ray.storage import StorageConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", action="append", required=True, help="folder or zip file (repeatable)")
    parser.add_argument("--dest", required=True, help="dataset root: s3://bucket/prefix or a folder")
    parser.add_argument("--scales", type=int, nargs="+", default=list(SCALES), choices=SCALES, help="LR scales")
    parser.add_argument("--dataset", default=None, help="dataset name for all sources (default: from the layout)")
    parser.add_argument(
        "--split", default="auto", choices=("auto", "train", "valid", "test"), help="split of loose images"
    )
    parser.add_argument("--workers", type=int, default=None, help="images processed at once (default: 2 x CPUs)")
    parser.add_argument(
        "--max-source-mb",
        type=int,
        default=None,
        help="largest source file or zip member read, in MiB (default 512); bounds the run's memory",
    )
    parser.add_argument("--verify", action="store_true", help="re-read and re-hash objects already stored")
    parser.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    cli.setup_logging()
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.max_source_mb is not None and args.max_source_mb < 1:
        parser.error(f"--max-source-mb must be >= 1, got {args.max_source_mb}")

    return cli.run(lambda: _ingest(args))


def _ingest(args: argparse.Namespace) -> int:
    from edsr_ray.ingest import MAX_SOURCE_BYTES, ingest

    storage = None
    if args.endpoint_url:
        storage = from_dict(StorageConfig, {"endpoint_url": args.endpoint_url}, source="--endpoint-url")
    report = ingest(
        args.source,
        args.dest,
        scales=args.scales,
        dataset=args.dataset,
        split=args.split,
        workers=args.workers,
        verify=args.verify,
        storage=storage,
        progress=not args.no_progress,
        max_source_bytes=MAX_SOURCE_BYTES if args.max_source_mb is None else args.max_source_mb << 20,
    )
    print(report.summary())
    return cli.ITEMS_FAILED if report.failed else cli.DONE


if __name__ == "__main__":
    cli.entry(main, "ingest")
