"""Quickstart: embedded S3 + local Ray + MLflow (sqlite), ingest sample photos, train a small EDSR, register it.

    python jobs/quickstart.py [section.key=value ...]

Runs in a few minutes on a 2-core CPU machine. Its S3 data (runs included) lives in quickstart/ and the MLflow store
in mlflow/ of the project home ($EDSR_RAY_HOME, default ~/.edsr-ray). Exit status as every command (README, "Exit
status"): 1 when the trained model does not beat bicubic.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edsr_ray import cli

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIG), help="config (default: configs/quickstart.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.total_steps=1000")
    args = parser.parse_args(argv)
    cli.setup_logging()
    return cli.run(lambda: _quickstart(args))


def _quickstart(args: argparse.Namespace) -> int:
    from edsr_ray.quickstart import run_quickstart

    result = run_quickstart(args.config, args.overrides)
    verdict = "beats" if result.psnr > result.bicubic_psnr else "does NOT beat"
    model = next(iter(result.registered.values()), None)
    print()
    print(
        f"Trained {result.steps} updates. Validation PSNR: EDSR {result.psnr:.2f} dB vs bicubic "
        f"{result.bicubic_psnr:.2f} dB: the model {verdict} bicubic ({result.psnr - result.bicubic_psnr:+.2f} dB)."
    )
    if model:
        print(f"Registered model: models:/{model}")
    print("Open the MLflow UI:")
    print(f"  MLFLOW_DISABLE_TELEMETRY=true mlflow ui --backend-store-uri {result.tracking_uri} --host 127.0.0.1")
    if model:
        print("Upscale an image with the new model:")
        print(f"  python jobs/upscale.py --model models:/{model} --input photo.png --output upscaled/")
    return cli.DONE if result.psnr > result.bicubic_psnr else cli.ITEMS_FAILED


if __name__ == "__main__":
    cli.entry(main, "quickstart")
