"""Upscale a collection of images and videos (folder, s3:// prefix, one file, or a list file) with an EDSR/MDSR model.

    python jobs/upscale.py --model SRC --input SRC --output DST [--scale N] [--outscale F | --width W | --height H]
        [--tile N] [--self-ensemble]
        [--precision auto|fp32|bf16|fp16] [--format same|png|jpeg|webp] [--quality Q] [--png-compression fast|small]
        [--video-codec h264|h265|vp9|av1|ffv1] [--crf N] [--video-preset P] [--video-format same|mp4|mkv|webm|mov]
        [--on-decode-error fail|conceal] [--max-video-frames N] [--max-video-seconds S]
        [--gpus N] [--workers N] [--batch-size N] [--max-pixels N] [--max-read-bytes N] [--allow-failures N]
        [--local] [-q]

    ray job submit --working-dir . -- python jobs/upscale.py --model models:/edsr_baseline_x4@best \\
        --input s3://photos/in/ --output s3://photos/x4/

Runs on the Ray cluster of the job (RAY_ADDRESS), a running local cluster, or a local Ray it starts; --local runs
everything in this process instead. Each output keeps its input's relative key under --output; outputs that exist
are skipped, so re-running a killed job does only what is missing. --outscale/--width/--height ask for a final size:
the smallest model scale that covers it, then a MATLAB-bicubic resize (antialiased when shrinking). Writes
_manifest.parquet and _summary.json next to the outputs and prints a summary line.

Exit status as every command (README, "Exit status"): 0 also when at most --allow-failures inputs failed, 1 when more
did (each is in the manifest with its reason, and logged); the summary line is printed by an interrupted run too.
"""

from __future__ import annotations

import argparse

from edsr_ray import cli
from edsr_ray.batch.job import ComputeOptions, UpscaleInterrupted, run_upscale
from edsr_ray.batch.stages import FORMAT_CHOICES, PNG_COMPRESSION, CodecOptions
from edsr_ray.codecs import MAX_PIXELS_DEFAULT
from edsr_ray.config import PRECISIONS, InferenceConfig, from_dict
from edsr_ray.outsize import OutputSize
from edsr_ray.storage import StorageConfig
from edsr_ray.video import CODECS, VideoLimits, VideoOptions
from edsr_ray.video.containers import REQUESTABLE
from edsr_ray.video.options import DECODE_ERROR_POLICIES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[-1],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--model", required=True, help="official .pt, project checkpoint, s3:// URI, or models:/name@alias")
    p.add_argument(
        "--input",
        required=True,
        help="folder or s3:// prefix (searched recursively), one image, or a list file: .txt/.lst (one path or URI a "
        "line) or .parquet (a 'path' or 'uri' column)",
    )
    p.add_argument("--output", required=True, help="folder or s3:// prefix; outputs keep their input's relative key")
    p.add_argument("--scale", type=int, help="upscaling factor; picks the branch of a multi-scale MDSR model")
    p.add_argument(
        "--outscale",
        metavar="F",
        help="final size = F x the input (e.g. 1.5, 3.5, 8): the smallest model scale >= F, then resized; past the "
        "largest model scale, enlarged by the resize",
    )
    p.add_argument("--width", type=int, metavar="W", help="final width in pixels (alone: the height keeps the aspect)")
    p.add_argument("--height", type=int, metavar="H", help="final height in pixels (with --width: exactly W x H)")
    p.add_argument("--tile", type=int, help="LR tile side (default: whole images when they fit in memory)")
    p.add_argument("--self-ensemble", action="store_true", help="average the 8 flips/transposes (EDSR+, 8x compute)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--format", choices=FORMAT_CHOICES, default="same", help="output format (same: as the input)")
    p.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality, 1-100 (default 95)")
    p.add_argument(
        "--png-compression",
        choices=PNG_COMPRESSION,
        default="fast",
        help="fast (default): fpng, far faster to encode, files a little larger; small: zlib level 6 like Pillow",
    )
    video = VideoOptions()
    p.add_argument("--video-codec", choices=list(CODECS), default=video.codec, help="video codec (ffv1: lossless)")
    p.add_argument("--crf", type=int, help="video quality, lower is better (default per codec: h264 18, h265 20, ...)")
    p.add_argument("--video-preset", help="encoder speed preset (x264/x265 names, VP9 0-8, AV1 0-13)")
    p.add_argument(
        "--video-format", choices=REQUESTABLE, default=video.container, help="video container (same: the input's)"
    )
    p.add_argument(
        "--on-decode-error",
        choices=DECODE_ERROR_POLICIES,
        default=video.on_decode_error,
        help="a frame that cannot be decoded: fail the video (default) or repeat the previous frame (counted)",
    )
    p.add_argument("--max-video-frames", type=int, default=video.limits.max_frames, help="refuse longer videos")
    p.add_argument(
        "--max-video-seconds", type=float, default=video.limits.max_seconds, help="refuse longer videos (seconds)"
    )
    p.add_argument("--gpus", type=int, help="model actors with one GPU each (default: all GPUs; 0: CPU only)")
    p.add_argument("--workers", type=int, help="at most this many model actors (default: one per GPU, or CPUs-1)")
    p.add_argument("--batch-size", type=int, help="images per model call (default 16 on GPU, 4 on CPU)")
    p.add_argument(
        "--max-pixels", type=int, default=MAX_PIXELS_DEFAULT, help="refuse larger inputs (pixels; per video frame)"
    )
    p.add_argument(
        "--max-read-bytes",
        type=int,
        help=f"refuse larger inputs, list files and weights files (default {StorageConfig.max_read_bytes:,} bytes)",
    )
    p.add_argument("--allow-failures", type=int, default=0, metavar="N", help="exit 0 with up to N failed inputs")
    p.add_argument("--local", action="store_true", help="run in this process, without Ray")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only (no progress lines)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.setup_logging(quiet=args.quiet)
    return cli.run(lambda: _upscale(args))


def _upscale(args: argparse.Namespace) -> int:
    inference = from_dict(
        InferenceConfig,
        {"tile": args.tile, "self_ensemble": args.self_ensemble, "precision": args.precision},
        source="command line",
    )
    size = from_dict(
        OutputSize, {"outscale": args.outscale, "width": args.width, "height": args.height}, source="command line"
    )
    options = CodecOptions(
        fmt=args.format, quality=args.quality, png_compression=args.png_compression, max_pixels=args.max_pixels
    )
    video = VideoOptions(
        codec=args.video_codec,
        crf=args.crf,
        preset=args.video_preset,
        container=args.video_format,
        on_decode_error=args.on_decode_error,
        limits=VideoLimits(args.max_pixels, args.max_video_frames, args.max_video_seconds),
    )
    compute = ComputeOptions(local=args.local, gpus=args.gpus, workers=args.workers, batch_size=args.batch_size)
    cfg = None
    if args.max_read_bytes is not None:
        cfg = from_dict(StorageConfig, {"max_read_bytes": args.max_read_bytes}, source="--max-read-bytes")
    try:
        summary = run_upscale(
            args.model,
            args.input,
            args.output,
            scale=args.scale,
            size=size,
            inference=inference,
            options=options,
            video=video,
            compute=compute,
            allow_failures=args.allow_failures,
            cfg=cfg,
        )
    except UpscaleInterrupted as exc:
        print(exc.summary.line(), flush=True)  # what was done; the error line follows
        raise
    print(summary.line(), flush=True)
    return summary.exit_code(args.allow_failures)


if __name__ == "__main__":
    cli.entry(main, "upscale")
