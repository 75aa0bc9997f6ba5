"""Upscale an image or a folder of images with an EDSR/MDSR model.

    python jobs/upscale.py --model edsr_baseline_x4.pt --input photos/ --output upscaled/ [--scale 4] [--tile 256]
        [--self-ensemble] [--precision auto|fp32|bf16|fp16] [--format same|png|jpeg|webp] [--quality 95]
        [--max-pixels N] [--allow-failures N] [--device cuda]

Each output keeps its input's relative path under --output; outputs that exist are skipped. Exit status: 0 when all
went well (or at most --allow-failures inputs failed), 1 when more inputs failed (each is reported on stderr with its
reason), 2 when the run could not start (model, scale, input or options).
"""

from __future__ import annotations

import argparse
import logging
import sys

from edsr_ray.config import PRECISIONS, InferenceConfig, from_dict
from edsr_ray.errors import EdsrRayError
from edsr_ray.imaging import MAX_PIXELS_DEFAULT
from edsr_ray.upscaling import OUTPUT_FORMATS, OutputOptions, run_upscale


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="weights: official .pt, project checkpoint, s3:// or models:/ URI")
    p.add_argument("--input", required=True, help="an image, or a folder walked recursively for png/jpg/webp")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--scale", type=int, help="upscaling factor; required for a multi-scale MDSR model")
    p.add_argument("--tile", type=int, help="LR tile side (default: whole images when they fit in memory)")
    p.add_argument("--self-ensemble", action="store_true", help="average the 8 flips/transposes (EDSR+)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto: fp32 on CPU, bf16 on GPU")
    p.add_argument("--format", choices=OUTPUT_FORMATS, default="same", help="output format")
    p.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality (1-100)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS_DEFAULT, help="refuse larger inputs (pixels)")
    p.add_argument("--allow-failures", type=int, default=0, metavar="N", help="exit 0 with up to N failed inputs")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr
    )
    try:
        inference = from_dict(
            InferenceConfig,
            {
                "tile": args.tile,
                "self_ensemble": args.self_ensemble,
                "precision": args.precision,
                "max_pixels": args.max_pixels,
            },
            source="command line",
        )
        options = OutputOptions(fmt=args.format, quality=args.quality, max_pixels=args.max_pixels)
        summary = run_upscale(
            args.model,
            args.input,
            args.output,
            scale=args.scale,
            inference=inference,
            options=options,
            device=args.device,
        )
    except EdsrRayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary.line())
    return summary.exit_code(args.allow_failures)


if __name__ == "__main__":
    sys.exit(main())
