"""Export an EDSR/MDSR model to ONNX (ONNX Runtime, TensorRT, OpenVINO, desktop upscalers).

    python jobs/export.py --model SOURCE [--scale S] --format onnx --output model.onnx [--fp16] [--opset N] [-q]

    python jobs/export.py --model models:/edsr_baseline_x4@best --output edsr_x4.onnx
    python jobs/export.py --model mdsr_baseline.pt --scale 3 --output mdsr_x3_fp16.onnx --fp16

--model is anything the other jobs take: an official .pt, a project checkpoint (file, checkpoint folder or s3://
prefix), or an MLflow models:/ or runs:/ URI. One file holds one scale: an MDSR model needs --scale, and is exported
once per scale. The file takes float32 (batch, 3, height, width) RGB in [0, 1], any batch and size, and returns
float32 (batch, 3, s*height, s*width) RGB, not clipped; scale, architecture, pixel range, layout and opset are in its
metadata (see edsr_ray/export.py). --opset: default 17, accepted 15 to 23. --fp16: float16 weights and compute, the
same float32 input and output.

Every file is checked before it is written (onnx.checker, then ONNX Runtime on CPU against PyTorch on odd-sized
inputs) and written atomically; nothing else is written.

Exit status: 0 written; 1 the export ran but its check failed (nothing written); 2 a bad model, scale, output or
option (one "error:" line).
"""

from __future__ import annotations

import argparse

from edsr_ray import cli
from edsr_ray.export import DEFAULT_OPSET, ExportError, export_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--model", required=True, help="official .pt, project checkpoint, s3:// URI, or models:/name@alias")
    p.add_argument("--scale", type=int, help="the scale to export; required for a multi-scale MDSR model")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="output format (onnx)")
    p.add_argument("--output", required=True, help="the file to write (.onnx): a local path or s3:// URI")
    p.add_argument("--fp16", action="store_true", help="float16 weights and compute (float32 input and output)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, 15-23 (default {DEFAULT_OPSET})")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.setup_logging(quiet=args.quiet)
    return cli.run(lambda: _export(args))


def _export(args: argparse.Namespace) -> int:
    try:
        result = export_model(args.model, args.output, scale=args.scale, fp16=args.fp16, opset=args.opset)
    except ExportError as exc:  # the export ran but its check failed: the one item of this command failed
        cli.error(exc)
        return cli.ITEMS_FAILED
    print(result.line(), flush=True)
    return cli.DONE


if __name__ == "__main__":
    cli.entry(main, "export")
