"""What an evaluation reports: per-image results, the means per model, set and scale, the paper's table, the result
files under the output location, the worst/best picture grids, and the MLflow run.

Files: ``results.md`` (the table), ``results.csv`` (one row per model, set, scale and image), ``results.json``
(options, models, summary, images, failures), ``failures.csv`` when any image failed, and, on request, SR images under
``images/`` and picture grids ``grid_<model>.png``; nothing is written outside the output location
(:func:`output_join`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edsr_ray import storage
from edsr_ray.codecs import decode_image, encode_image
from edsr_ray.errors import StorageError
from edsr_ray.evaluation.sets import protocol_for
from edsr_ray.storage import StorageConfig

PROTOCOL_NOTE = (
    "PSNR (dB) / SSIM of 8-bit outputs. Benchmark sets: Y channel, `scale` border pixels ignored; DIV2K: RGB PSNR, "
    "`scale + 6` border pixels ignored (SSIM on Y)."
)


@dataclass(frozen=True)
class ImageResult:
    """One model variant on one image at one scale; ``status`` is ``ok`` or ``failed`` (see ``error``)."""

    model: str
    set: str
    scale: int
    image: str
    psnr: float = math.nan
    ssim: float = math.nan
    seconds: float = math.nan
    status: str = "ok"
    error: str = ""
    sr_uri: str = ""
    picture: bytes = b""  # JPEG strip bicubic | model | HR for the picture grid (only with options.grid)

    def record(self) -> dict[str, Any]:
        """The CSV/JSON fields."""
        return {
            "model": self.model,
            "set": self.set,
            "scale": self.scale,
            "image": self.image,
            "psnr": _finite_or_none(self.psnr),
            "ssim": _finite_or_none(self.ssim),
            "seconds": _finite_or_none(self.seconds),
            **({"sr_image": self.sr_uri} if self.sr_uri else {}),
        }


@dataclass(frozen=True)
class SummaryRow:
    """Mean PSNR/SSIM of one model variant on one set at one scale (over the images that did not fail)."""

    model: str
    set: str
    scale: int
    protocol: str
    images: int
    failed: int
    psnr: float
    ssim: float
    seconds: float


@dataclass
class EvaluationReport:
    """Everything a run produced: per-image results, failures, the summary, the table and the files written."""

    results: list[ImageResult]
    failures: list[ImageResult]
    summary: list[SummaryRow]
    table: str
    variants: list[str]
    # What was run, as the result files record it: the options (without endpoints or tracking URIs, which may name
    # internal hosts) and, per --model, its label, source, scales and columns.
    options: dict[str, Any] = field(default_factory=dict)
    models: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        """0 when every image was evaluated, 1 when some failed (they are listed in ``failures``)."""
        return 1 if self.failures else 0


def _finite_or_none(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def safe_name(text: str) -> str:
    """``text`` reduced to a file-name-safe form (letters, digits, ``.-_``; ``+`` becomes ``_plus``)."""
    text = text.replace("+", "_plus")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "item"


def output_join(output: str, *parts: str) -> str:
    """``output/parts...``; refuses anything that would land outside ``output`` (``..``, a symbolic link out)."""
    uri = storage.join(output, *parts)
    if not storage.is_s3(uri):
        root = os.path.realpath(storage.local_path(output))
        parent = os.path.realpath(os.path.dirname(storage.local_path(uri)))
        if parent != root and not parent.startswith(root.rstrip(os.sep) + os.sep):
            raise StorageError(f"refusing to write {uri}: it resolves outside the output folder {output}")
    return uri


def summarize(results: Iterable[ImageResult], protocols: Mapping[str, str]) -> list[SummaryRow]:
    """Means per (variant, set, scale) over the images evaluated, with counts of images and failures."""
    groups: dict[tuple[str, str, int], list[ImageResult]] = defaultdict(list)
    for r in results:
        groups[(r.model, r.set, r.scale)].append(r)

    def mean(values: list[float]) -> float:
        # The official code averages per-image PSNR (not the PSNR of the pooled MSE); so does the paper's table.
        return float(np.mean(values)) if values else math.nan

    rows = []
    for (model, set_name, scale), members in groups.items():
        ok = [r for r in members if r.status == "ok"]
        rows.append(
            SummaryRow(
                model=model,
                set=set_name,
                scale=scale,
                protocol=protocols.get(set_name, protocol_for(set_name)),
                images=len(ok),
                failed=len(members) - len(ok),
                psnr=mean([r.psnr for r in ok]),
                ssim=mean([r.ssim for r in ok]),
                seconds=mean([r.seconds for r in ok]),
            )
        )
    return rows


def format_cell(row: SummaryRow | None) -> str:
    """``38.11/.9601`` as in the paper; ``n/a`` when the model lacks the scale; ``*`` when some images failed."""
    if row is None:
        return "n/a"
    if row.images == 0:
        return "failed"
    ssim_text = f"{row.ssim:.4f}".replace("0.", ".", 1) if math.isfinite(row.ssim) else "nan"
    return f"{row.psnr:.2f}/{ssim_text}" + ("*" if row.failed else "")


def markdown_table(
    summary: Sequence[SummaryRow], variants: Sequence[str], sets: Sequence[str], scales: Sequence[int]
) -> str:
    """The paper's layout: one row per set and scale, one column per model variant, cells PSNR/SSIM."""
    by_key = {(r.model, r.set, r.scale): r for r in summary}
    lines = [
        "| Dataset | Scale | " + " | ".join(variants) + " |",
        "|---|---|" + "---|" * len(variants),
    ]
    for set_name in sets:
        for scale in scales:
            cells = [format_cell(by_key.get((v, set_name, scale))) for v in variants]
            lines.append(f"| {set_name} | ×{scale} | " + " | ".join(cells) + " |")
    notes = [PROTOCOL_NOTE]
    failed = [r for r in summary if r.failed]
    if failed:
        notes.append(
            "\\* some images failed and are left out of the mean: "
            + "; ".join(f"{r.model} {r.set} ×{r.scale}: {r.failed} of {r.failed + r.images}" for r in failed)
            + " (see failures.csv)."
        )
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n"


def _csv(records: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for rec in records:
        writer.writerow({k: ("" if rec.get(k) is None else rec.get(k)) for k in columns})
    return buf.getvalue().encode()


def write_outputs(report: EvaluationReport, output: str, cfg: StorageConfig | None = None) -> None:
    """``results.md``, ``results.csv``, ``results.json`` (+ ``failures.csv``) under the output location."""
    ok_records = [r.record() for r in report.results]
    failure_records = [{**r.record(), "error": r.error} for r in report.failures]
    document = {
        "protocol": PROTOCOL_NOTE,
        "options": report.options,
        "models": report.models,
        "summary": [{k: _json_value(v) for k, v in asdict(r).items()} for r in report.summary],
        "images": ok_records,
        "failures": failure_records,
    }
    files = {
        "results.md": report.table.encode(),
        "results.csv": _csv(ok_records, ["model", "set", "scale", "image", "psnr", "ssim", "seconds"]),
        "results.json": json.dumps(document, indent=2).encode(),
    }
    if report.failures:
        files["failures.csv"] = _csv(failure_records, ["model", "set", "scale", "image", "error"])
    for name, data in files.items():
        uri = output_join(output, name)
        storage.write_bytes(uri, data, cfg)
        report.files[name] = uri


def _json_value(v: Any) -> Any:
    return _finite_or_none(v) if isinstance(v, float) else v


def picture_grid(
    results: Sequence[ImageResult], k: int, baseline: Mapping[tuple[str, int, str], float]
) -> bytes | None:
    """PNG of the ``k`` worst and ``k`` best images of one variant (bicubic | model | HR centre crops, captioned).

    Images are ranked by PSNR gain over bicubic when the bicubic baseline was evaluated too, else by PSNR.
    """
    from PIL import Image, ImageDraw

    ranked = [r for r in results if r.status == "ok" and r.picture]
    if not ranked:
        return None

    def gain(r: ImageResult) -> float:
        base = baseline.get((r.set, r.scale, r.image))
        return r.psnr - base if base is not None else r.psnr

    ranked.sort(key=gain)
    chosen = [("worst", r) for r in ranked[:k]] + [("best", r) for r in ranked[max(k, len(ranked) - k) :][::-1]]
    strips, caption_h = [], 16
    for tag, r in chosen:
        strip = Image.open(io.BytesIO(r.picture)).convert("RGB")
        canvas = Image.new("RGB", (strip.width, strip.height + caption_h), "white")
        canvas.paste(strip, (0, caption_h))
        base = baseline.get((r.set, r.scale, r.image))
        extra = f" ({r.psnr - base:+.2f} vs bicubic)" if base is not None else ""
        ImageDraw.Draw(canvas).text((2, 2), f"{tag}: {r.set} {r.image} x{r.scale} {r.psnr:.2f} dB{extra}", fill="black")
        strips.append(canvas)
    width = max(s.width for s in strips)
    grid = Image.new("RGB", (width, sum(s.height + 4 for s in strips)), "white")
    y = 0
    for s in strips:
        grid.paste(s, (0, y))
        y += s.height + 4
    return encode_image(np.asarray(grid), "png")


def log_to_mlflow(
    report: EvaluationReport, experiment: str, uri: str, grids: Mapping[str, bytes], cfg: StorageConfig | None = None
) -> str:
    """One MLflow run: options as params, PSNR/SSIM per set, scale and variant as metrics, the outputs as artifacts."""
    from edsr_ray import tracking

    mlflow = tracking.mlflow_module()
    exp_id = tracking.ensure_experiment(experiment, uri)
    run = mlflow.MlflowClient(tracking_uri=uri).create_run(
        exp_id, run_name="evaluate", tags={"edsr_ray.job": "evaluate"}
    )
    run_logger = tracking.RunLogger(run.info.run_id, uri)
    params = {k: json.dumps(v) if isinstance(v, list) else v for k, v in report.options.items()}
    run_logger.log_params(params)
    metrics = {}
    for r in report.summary:
        key = f"{safe_name(r.set)}/x{r.scale}/{safe_name(r.model)}"
        metrics[f"psnr/{key}"] = r.psnr
        metrics[f"ssim/{key}"] = r.ssim
    metrics["failed_images"] = float(len(report.failures))
    run_logger.log_metrics(metrics, step=0)
    run_logger.log_text(report.table, "results.md")
    for name in ("results.csv", "results.json", "failures.csv"):
        if name in report.files:
            run_logger.log_text(storage.read_bytes(report.files[name], cfg).decode(), name)
    for label, png in grids.items():
        run_logger.log_image(np.asarray(decode_image(png).rgb), f"grid_{safe_name(label)}.png")
    run_logger.end("FAILED" if report.failures else "FINISHED")
    return run.info.run_id
