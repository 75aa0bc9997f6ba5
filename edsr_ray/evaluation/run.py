"""An evaluation run: the paper's PSNR/SSIM tables for any models on any HR/LR sets, distributed with Ray Data.

``jobs/evaluate.py`` is a thin command over :func:`evaluate`. A run, in order:

* **Sets** (:mod:`edsr_ray.evaluation.sets`): the sets found at each ``--dataset``, or the ones asked for by name.
* **Models.** :class:`ModelSpec`: ``[LABEL=]SOURCE`` where SOURCE is anything :func:`~edsr_ray.weights.load_model`
  reads, or ``bicubic`` (the baseline row: ``imresize(lr, scale)``). An MDSR model is evaluated at every requested
  scale it has; an EDSR model only at its own (its other cells read ``n/a``). Single-scale models given one label
  share a column, each filling its scale (``EDSR=edsr_x2.pt EDSR=edsr_x3.pt EDSR=edsr_x4.pt`` is the paper's "EDSR").
* **Preflight.** Everything checkable without computing is checked before any image is upscaled: models load, sets
  exist, every LR partner exists (and, with a manifest, has size HR / scale). Problems raise
  :class:`~edsr_ray.errors.EvaluationError` naming every bad item.
* **Per-image work** (:mod:`edsr_ray.evaluation.scoring`): one code path, run by Ray Data in an actor pool (one GPU
  per actor when the cluster has GPUs), or in this process with ``use_ray=False``. A problem found only while
  evaluating (a size mismatch without a manifest, an undecodable file) fails that image alone: it is listed with its
  reason, left out of the means, the table cell is marked, and the report's exit status is 1.
* **Outputs** (:mod:`edsr_ray.evaluation.report`) under the output location only, and in MLflow when a tracking URI
  is given or ``MLFLOW_TRACKING_URI`` is set.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Any

from edsr_ray import storage
from edsr_ray.config import PRECISIONS, SCALES, to_dict
from edsr_ray.errors import ConfigError, EvaluationError
from edsr_ray.evaluation.report import (
    EvaluationReport,
    ImageResult,
    log_to_mlflow,
    markdown_table,
    output_join,
    picture_grid,
    safe_name,
    summarize,
    write_outputs,
)
from edsr_ray.evaluation.scoring import ImageEvaluator
from edsr_ray.evaluation.sets import EvalSet, select_sets, table_order
from edsr_ray.infra.ray import ensure_ray
from edsr_ray.metrics import PROTOCOLS
from edsr_ray.storage import StorageConfig

logger = logging.getLogger(__name__)

BICUBIC = "bicubic"
ENSEMBLE_MODES = ("off", "both", "only")
# Problems listed in one error message before "... and N more".
_LIST_LIMIT = 12


# --------------------------------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate: its column label and source (a weights location or ``bicubic``)."""

    label: str
    source: str

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``SOURCE`` or ``LABEL=SOURCE``; the default label is the file stem (``edsr_x2``), ``name/version`` for
        ``models:/name/version``, or ``bicubic``."""
        text = text.strip()
        if not text:
            raise EvaluationError("--model needs a source: a weights file or URI, models:/name/version, or bicubic")
        head, sep, tail = text.partition("=")
        if sep and head and not any(c in head for c in "/:\\") and tail:
            return cls(head, tail)
        return cls(default_label(text), text)

    @property
    def is_bicubic(self) -> bool:
        return self.source.lower() == BICUBIC


def default_label(source: str) -> str:
    if source.lower() == BICUBIC:
        return BICUBIC
    for prefix in ("models:/", "runs:/"):
        if source.startswith(prefix):
            return source[len(prefix) :].strip("/")
    stem = PurePosixPath(source.rstrip("/").replace("\\", "/")).name
    return re.sub(r"\.(pt|pth)$", "", stem) or source


@dataclass(frozen=True)
class Variant:
    """One column of the table: a model, with or without ×8 self-ensemble (label ``NAME+``)."""

    label: str
    model: str  # the ModelSpec label
    self_ensemble: bool


@dataclass
class _ResolvedModel:
    spec: ModelSpec
    scales: tuple[int, ...]
    variants: list[Variant]
    checkpoint: dict[str, Any] | None  # None for bicubic


# --------------------------------------------------------------------------------------------------------------------
# Options and results


@dataclass(frozen=True)
class EvaluationOptions:
    """What to evaluate, how and where the results go (the command's arguments, validated).

    ``scales`` empty: every scale the models have (2, 3, 4 for bicubic alone). ``self_ensemble``: ``off``, ``both``
    (plain and ``+`` columns) or ``only`` (just ``+``). ``protocol``: ``auto`` (by set) or one for all sets.
    ``precision`` defaults to fp32 so numbers are comparable with the paper. ``grid``: worst and best images per
    model in a picture grid (0: none). ``workers``: actors (default: one per GPU, or one per CPU). ``use_ray=False``
    evaluates in this process.
    """

    models: tuple[str, ...]
    datasets: tuple[str, ...]
    output: str
    sets: tuple[str, ...] = ()
    scales: tuple[int, ...] = ()
    self_ensemble: str = "off"
    protocol: str = "auto"
    tile: int | None = None
    precision: str = "fp32"
    limit: int | None = None
    save_images: bool = False
    grid: int = 0
    tracking_uri: str | None = None
    experiment: str = "edsr-ray-eval"
    workers: int | None = None
    use_ray: bool = True
    storage: StorageConfig | None = None

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(bool(self.models), "give at least one --model (a weights file or URI, models:/..., or bicubic)")
        need(bool(self.datasets), "give at least one --dataset (an ingested root, a set folder or an image folder)")
        need(bool(self.output), "give an --output location (a folder or s3:// prefix)")
        for s in self.scales:
            need(s in SCALES, f"scale {s} is not supported; choose from {list(SCALES)}")
        need(self.self_ensemble in ENSEMBLE_MODES, f"self_ensemble must be one of {list(ENSEMBLE_MODES)}")
        need(self.protocol in ("auto", *PROTOCOLS), f"protocol must be auto or one of {list(PROTOCOLS)}")
        need(self.tile is None or self.tile >= 8, f"tile must be >= 8, got {self.tile}")
        need(self.precision in PRECISIONS, f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        need(self.limit is None or self.limit >= 1, f"limit must be >= 1, got {self.limit}")
        need(self.grid >= 0, f"grid must be >= 0, got {self.grid}")
        need(self.workers is None or self.workers >= 1, f"workers must be >= 1, got {self.workers}")
        # Locations in a scheme nothing here reads (gs://, S3://, gs:bucket) fail now, before anything is created.
        for dataset in self.datasets:
            storage.location_kind(dataset, storage.DATA_LOCATIONS, what="--dataset")
        storage.location_kind(self.output, storage.DATA_LOCATIONS, what="--output")
        for model in self.models:
            spec = ModelSpec.parse(model)
            if not spec.is_bicubic:
                storage.location_kind(spec.source, storage.MODEL_LOCATIONS, what="--model")


# --------------------------------------------------------------------------------------------------------------------
# Planning and preflight


def resolve_models(specs: Sequence[ModelSpec], ensemble: str, cfg: StorageConfig | None) -> list[_ResolvedModel]:
    """Load every model once (a bad file fails here, by name) and decide its table columns."""
    from edsr_ray.weights import load_model, model_checkpoint

    out: list[_ResolvedModel] = []
    for spec in specs:
        if spec.is_bicubic and any(m.spec.label == spec.label for m in out):
            raise EvaluationError(f"two --model entries are both labelled {spec.label!r}; name them with LABEL=SOURCE")
        if spec.is_bicubic:
            out.append(_ResolvedModel(spec, tuple(SCALES), [Variant(spec.label, spec.label, False)], None))
            continue
        model = load_model(spec.source, storage=cfg)
        variants = []
        if ensemble in ("off", "both"):
            variants.append(Variant(spec.label, spec.label, False))
        if ensemble in ("both", "only"):
            variants.append(Variant(f"{spec.label}+", spec.label, True))
        for other in out:
            # One label may gather single-scale models into one column (EDSR x2, x3, x4 as the paper's "EDSR").
            if other.spec.label == spec.label and (other.checkpoint is None or set(other.scales) & set(model.scales)):
                raise EvaluationError(
                    f"--model {spec.label}={spec.source} and {other.spec.label}={other.spec.source} share a label and "
                    f"a scale ({sorted(set(other.scales) & set(model.scales)) or 'bicubic'}); one column takes each "
                    "scale from one model: give them different labels"
                )
        out.append(_ResolvedModel(spec, tuple(model.scales), variants, model_checkpoint(model)))
    _check_columns(out)
    return out


def _check_columns(models: Sequence[_ResolvedModel]) -> None:
    """Every table column holds one model family, and no two columns share a file/metric name."""
    owners: dict[str, str] = {}  # column label -> the --model label it comes from
    names: dict[str, str] = {}  # safe_name(column) -> column label
    for m in models:
        for v in m.variants:
            owner = owners.setdefault(v.label, v.model)
            if owner != v.model:
                raise EvaluationError(
                    f"the column {v.label!r} would hold both --model {owner} and the self-ensemble of --model "
                    f"{v.model}: rename one of them (labels ending in '+' are taken by self-ensembles)"
                )
            other = names.setdefault(safe_name(v.label), v.label)
            if other != v.label:
                raise EvaluationError(
                    f"the columns {other!r} and {v.label!r} would share the file and metric name "
                    f"{safe_name(v.label)!r}: rename one of them"
                )


def plan_items(
    sets: Sequence[EvalSet], scales: Sequence[int], protocol: str = "auto"
) -> tuple[list[dict[str, Any]], list[str]]:
    """Work items (set, image, scale, protocol, HR and LR URIs) plus the problems found without reading an image:
    missing LR partners and, where a manifest recorded sizes, LR sizes other than HR / scale."""
    items, problems = [], []
    for s in sets:
        for scale in scales:
            missing = []
            for img in s.images:
                lr_uri = "" if s.generated else img.lr_uris.get(scale)
                if lr_uri is None:
                    missing.append(img.id)
                    continue
                if lr_uri and img.hr_size is not None and scale in img.lr_sizes:
                    (hw, hh), (lw, lh) = img.hr_size, img.lr_sizes[scale]
                    if (lw, lh) != (hw // scale, hh // scale):
                        problems.append(
                            f"{s.name}/{img.id} x{scale}: size mismatch: LR {lr_uri} is {lw}x{lh} but HR "
                            f"{img.hr_uri} is {hw}x{hh}; x{scale} needs {hw // scale}x{hh // scale}"
                        )
                        continue
                items.append(
                    {
                        "set": s.name,
                        "image": img.id,
                        "scale": int(scale),
                        "protocol": s.protocol if protocol == "auto" else protocol,
                        "hr_uri": img.hr_uri,
                        "lr_uri": lr_uri,
                    }
                )
            if missing and len(missing) == len(s.images) and len(missing) > 1:
                problems.append(f"{s.name} x{scale}: no LR images at all (is X{scale} ingested for {s.location}?)")
            else:
                problems.extend(
                    f"{s.name}/{i} x{scale}: missing LR partner of {_hr_uri(s, i)} ({_missing_hint(s, i, scale)})"
                    for i in missing
                )
    return items, problems


def _hr_uri(s: EvalSet, image_id: str) -> str:
    return next(img.hr_uri for img in s.images if img.id == image_id)


def _missing_hint(s: EvalSet, image_id: str, scale: int) -> str:
    """Where the missing LR image was looked for."""
    if s.kind == "manifest":
        return f"the manifest has no lr_x{scale}_key for it; ingest X{scale} for this set"
    hr = _hr_uri(s, image_id)
    stem = PurePosixPath(hr).stem
    if "_HR/" in hr:  # DIV2K layout
        return f"expected {hr.rsplit('/', 1)[0][: -len('_HR')]}_LR_bicubic/X{scale}/{stem}x{scale}.png"
    folder = hr.rsplit("/HR/", 1)[0]
    return f"expected {folder}/LR_bicubic/X{scale}/{stem}x{scale}.png"


def _listing(problems: Sequence[str]) -> str:
    shown = list(problems[:_LIST_LIMIT])
    more = len(problems) - len(shown)
    return "; ".join(shown) + (f"; ... and {more} more" if more else "")


def _check_output(output: str) -> None:
    if not storage.is_s3(output):
        path = storage.local_path(output)
        if os.path.exists(path) and not os.path.isdir(path):
            raise EvaluationError(f"--output {output} is a file; expected a folder (created when missing)")


# --------------------------------------------------------------------------------------------------------------------
# Running: Ray Data actor pool, or in-process


def _run_items(
    items: list[dict[str, Any]], models: Sequence[_ResolvedModel], options: EvaluationOptions
) -> list[ImageResult]:
    """Evaluate the work items with an actor pool (Ray Data), or in this process when ``use_ray`` is off."""
    kwargs = {
        "tile": options.tile,
        "precision": options.precision,
        "storage_config": to_dict(options.storage) if options.storage is not None else None,
        "output": options.output,
        "save_images": options.save_images,
        "pictures": options.grid > 0,
    }

    def spec(m: _ResolvedModel, checkpoint: Any) -> dict[str, Any]:
        return {"checkpoint": checkpoint, "scales": list(m.scales), "variants": [asdict(v) for v in m.variants]}

    if not options.use_ray:
        evaluator = ImageEvaluator([spec(m, m.checkpoint) for m in models], **kwargs)
        return [r for item in items for r in evaluator.evaluate(item)]

    import ray

    # Weights go to the object store once; every actor reads them from there (not from the model's original source,
    # which workers may not reach, e.g. an MLflow server only the driver can see).
    specs = [spec(m, None if m.checkpoint is None else ray.put(m.checkpoint)) for m in models]
    resources = ray.cluster_resources()
    if any(m.checkpoint is not None for m in models) and resources.get("GPU", 0) >= 1:
        slots, per_actor = int(resources["GPU"]), {"num_gpus": 1}
    else:
        slots, per_actor = max(1, int(resources.get("CPU", 1))), {"num_cpus": 1}
    actors = max(1, min(options.workers or slots, len(items)))
    logger.info("evaluating %d work items on up to %d actor(s) with %s", len(items), actors, per_actor)
    # One block per item, so the pool spreads single images over its actors instead of handing one actor a block.
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        ImageEvaluator,
        fn_constructor_args=(specs,),
        fn_constructor_kwargs=kwargs,
        batch_size=1,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        **per_actor,
    )
    return [_result_from_row(r) for r in ds.take_all()]


def _result_from_row(row: Mapping[str, Any]) -> ImageResult:
    def num(x: Any) -> float:
        return math.nan if x is None else float(x)

    return ImageResult(
        model=str(row["model"]),
        set=str(row["set"]),
        scale=int(row["scale"]),
        image=str(row["image"]),
        psnr=num(row["psnr"]),
        ssim=num(row["ssim"]),
        seconds=num(row["seconds"]),
        status=str(row["status"]),
        error=str(row["error"] or ""),
        sr_uri=str(row["sr_uri"] or ""),
        picture=bytes(row["picture"] or b""),
    )


# --------------------------------------------------------------------------------------------------------------------
# The whole run


def _public_options(options: EvaluationOptions) -> dict[str, Any]:
    # Endpoints and tracking URIs stay out of result files and run params (they may name internal hosts).
    return {k: v for k, v in to_dict(options).items() if k not in ("storage", "tracking_uri")}


def evaluate(options: EvaluationOptions) -> EvaluationReport:
    """Evaluate every model on every selected set and scale; write the outputs; log to MLflow if configured.

    Raises :class:`EvaluationError` (or another :class:`~edsr_ray.errors.EdsrRayError`) before computing anything
    when an input is wrong; images that fail while being evaluated are reported in the result instead.
    """
    start = time.perf_counter()
    cfg = options.storage
    _check_output(options.output)
    tracking_uri = options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if tracking_uri:
        from edsr_ray import tracking

        tracking_uri = tracking.resolve_tracking_uri(tracking_uri)
        tracking.check_tracking_uri(tracking_uri)
    specs = [ModelSpec.parse(m) for m in options.models]
    sets = select_sets(options.datasets, options.sets, cfg, limit=options.limit, exclude=options.output)
    models = resolve_models(specs, options.self_ensemble, cfg)
    learned = sorted({s for m in models if m.checkpoint is not None for s in m.scales})
    scales = sorted(set(options.scales)) if options.scales else (learned or list(SCALES))
    for m in models:
        if m.checkpoint is not None and not set(m.scales) & set(scales):
            raise EvaluationError(
                f"model {m.spec.label} ({m.spec.source}) upscales by {list(m.scales)}, none of the requested scales "
                f"{scales}"
            )
    # Only the scales some column has are read; the table still shows every requested scale (n/a where none has it).
    needed = [s for s in scales if any(s in m.scales for m in models)]
    items, problems = plan_items(sets, needed, options.protocol)
    if problems:
        raise EvaluationError(f"{len(problems)} problem(s) in the evaluation data: {_listing(problems)}")

    if options.use_ray:
        ensure_ray()
    columns = ", ".join(v.label for m in models for v in m.variants)
    logger.info("evaluating %s on %s at x%s", columns, ", ".join(s.name for s in sets), "/x".join(map(str, scales)))
    results = _run_items(items, models, options)

    # Table columns: plain models, then the "+" ones, as in the paper; models sharing a label share a column.
    variants = [v.label for m in models for v in m.variants if not v.self_ensemble]
    variants += [v.label for m in models for v in m.variants if v.self_ensemble]
    variants = list(dict.fromkeys(variants))
    order = {(it["set"], it["image"], it["scale"]): i for i, it in enumerate(items)}
    results.sort(key=lambda r: (variants.index(r.model), order.get((r.set, r.image, r.scale), 0)))
    protocols = {it["set"]: it["protocol"] for it in items}
    summary = summarize(results, protocols)
    set_names = table_order([s.name for s in sets])
    report = EvaluationReport(
        results=[r for r in results if r.status == "ok"],
        failures=[r for r in results if r.status != "ok"],
        summary=summary,
        table=markdown_table(summary, variants, set_names, scales),
        variants=variants,
        options=_public_options(options),
        models=[
            {
                "label": m.spec.label,
                "source": m.spec.source,
                "scales": list(m.scales),
                "columns": [v.label for v in m.variants],
            }
            for m in models
        ],
    )
    write_outputs(report, options.output, cfg)
    grids = {}
    if options.grid > 0:
        bicubic = {m.spec.label for m in models if m.checkpoint is None}
        baseline = {(r.set, r.scale, r.image): r.psnr for r in report.results if r.model in bicubic}
        for label in variants:
            png = picture_grid([r for r in report.results if r.model == label], options.grid, baseline)
            if png is not None:
                grids[label] = png
                uri = output_join(options.output, f"grid_{safe_name(label)}.png")
                storage.write_bytes(uri, png, cfg)
                report.files[f"grid_{safe_name(label)}.png"] = uri
    if tracking_uri:
        report.mlflow_run_id = log_to_mlflow(report, options.experiment, tracking_uri, grids, cfg)
    report.seconds = time.perf_counter() - start
    return report
