"""Quickstart: embedded S3 + local Ray + MLflow (sqlite), ingest sample photos, train a small EDSR, register it.

    python jobs/quickstart.py [section.key=value ...]

Runs in a few minutes on a 2-core CPU machine. Data, runs and the MLflow store live under $EDSR_RAY_HOME/quickstart
(default ~/.edsr-ray/quickstart).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from edsr_ray.errors import EdsrRayError

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIG), help="config (default: configs/quickstart.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.total_steps=1000")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from edsr_ray.quickstart import run_quickstart

    try:
        result = run_quickstart(args.config, args.overrides)
    except EdsrRayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
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
    return 0 if result.psnr > result.bicubic_psnr else 1


if __name__ == "__main__":
    sys.exit(main())
