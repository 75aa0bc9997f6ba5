"""Typed, frozen configuration loaded from YAML with dotted command-line overrides.

Every section is a frozen dataclass that validates itself in ``__post_init__``; :func:`load_config` turns a YAML file
plus overrides such as ``train.lr=2e-4`` into an :class:`ExperimentConfig`, and any unknown key, wrong type or invalid
value is a :class:`~edsr_ray.errors.ConfigError` that names the file and the dotted key, raised before any work starts.
At the Ray boundary configs travel as plain dicts (:func:`to_dict`) and are rebuilt with :func:`from_dict`.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from edsr_ray import home, storage
from edsr_ray.errors import ConfigError, FieldError, LocationError, require
from edsr_ray.storage import StorageConfig

SCALES = (2, 3, 4)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ARCHS = ("edsr", "mdsr")
# A YAML config file larger than this is refused unread (real ones are a few kilobytes).
MAX_CONFIG_BYTES = 1 << 20

T = TypeVar("T")


def _require_location(value: str | None, key: str, *, models: bool = False) -> None:
    """A location setting must be in a scheme it supports: a local path, file:// or s3:// (and models:/ or runs:/ for
    weights); ``gs://x`` is refused here, naming the key, instead of becoming a local folder "gs:" at run time."""
    if not value:
        return
    try:
        storage.location_kind(value, storage.MODEL_LOCATIONS if models else storage.DATA_LOCATIONS)
    except LocationError as exc:
        raise FieldError(key, str(exc)) from None


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of an EDSR or MDSR network (everything needed to rebuild it from weights)."""

    arch: str = "edsr"  # edsr or mdsr
    n_resblocks: int = 16  # residual blocks in the body (paper: EDSR 32, MDSR 80; baselines 16)
    n_feats: int = 64  # feature channels (paper EDSR: 256)
    # EDSR has exactly one scale; MDSR one upsampling branch per listed scale (official order 2, 3, 4).
    scales: tuple[int, ...] = (2,)
    res_scale: float = 1.0  # residual scaling in each block (paper EDSR: 0.1); not stored in official weights
    n_colors: int = 3  # image channels
    rgb_range: int = 255  # pixel range the network works in (official weights: 255)

    def __post_init__(self) -> None:
        require(self.arch in ARCHS, "arch", f"must be one of {list(ARCHS)}, got {self.arch!r}")
        require(self.n_resblocks >= 1, "n_resblocks", f"must be >= 1, got {self.n_resblocks}")
        require(self.n_feats >= 1, "n_feats", f"must be >= 1, got {self.n_feats}")
        require(len(self.scales) >= 1, "scales", "must list at least one scale")
        for s in self.scales:
            require(s in SCALES, "scales", f"scale {s} is not supported; choose from {list(SCALES)}")
        require(len(set(self.scales)) == len(self.scales), "scales", f"repeated scale in {list(self.scales)}")
        if self.arch == "edsr":
            require(len(self.scales) == 1, "scales", f"an EDSR model has one scale, got {list(self.scales)}")
        require(self.res_scale > 0, "res_scale", f"must be > 0, got {self.res_scale}")
        require(self.n_colors in (1, 3), "n_colors", f"must be 1 or 3, got {self.n_colors}")
        require(self.rgb_range > 0, "rgb_range", f"must be > 0, got {self.rgb_range}")

    @property
    def scale(self) -> int:
        """The single scale of an EDSR model (the first scale of an MDSR model)."""
        return self.scales[0]


@dataclass(frozen=True)
class DataConfig:
    """Where the training images live and how patches are cut from them."""

    # Dataset root (``s3://bucket/prefix`` or a folder) as written by ``jobs/ingest.py``; holds ``manifest.parquet``.
    root: str = ""
    train_range: tuple[int, int] = (1, 800)  # DIV2K image numbers used for training, inclusive
    val_range: tuple[int, int] = (801, 810)  # DIV2K image numbers used for validation (paper: 801-810)
    patch_size: int = 48  # LR patch side; the HR patch is patch_size * scale
    augment: bool = True  # random hflip, vflip and transpose
    # Patches cut from one decoded image before moving on (decoding a 2K PNG costs far more than cutting a patch).
    patches_per_image: int = 64
    # Patches per training epoch; one epoch of the stream is a fresh set of random crops.
    epoch_patches: int = 16_000
    # Validation on HR centre crops of at most this side (None: whole images, as in the paper).
    val_max_size: int | None = None
    seed: int = 0  # seed of the patch stream (crops, flips, scale draws)

    def __post_init__(self) -> None:
        for key in ("train_range", "val_range"):
            lo, hi = getattr(self, key)
            require(1 <= lo <= hi, key, f"must be [first, last] with 1 <= first <= last, got {[lo, hi]}")
        require(self.patch_size >= 8, "patch_size", f"must be >= 8, got {self.patch_size}")
        require(self.patches_per_image >= 1, "patches_per_image", f"must be >= 1, got {self.patches_per_image}")
        require(self.epoch_patches >= 1, "epoch_patches", f"must be >= 1, got {self.epoch_patches}")
        if self.val_max_size is not None:
            require(self.val_max_size >= 16, "val_max_size", f"must be >= 16 or null, got {self.val_max_size}")
        _require_location(self.root, "root")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation recipe. Defaults are the paper's: L1, Adam(0.9, 0.999, 1e-8), lr 1e-4 halved every 2e5 updates."""

    batch_size: int = 16  # global batch: split evenly over the workers
    lr: float = 1e-4  # initial learning rate
    lr_step: int = 200_000  # updates between learning-rate decays
    lr_gamma: float = 0.5  # decay factor
    betas: tuple[float, float] = (0.9, 0.999)  # Adam betas
    eps: float = 1e-8  # Adam epsilon
    total_steps: int = 300_000  # updates in the whole run (paper: 3e5 baselines, 1e6 final models)
    val_every: int = 10_000  # updates between validations; each validation writes a checkpoint
    log_every: int = 100  # updates between loss / lr / throughput logs
    # Initial weights: an official .pt, a project checkpoint, or an MLflow ``models:/`` URI (e.g. an x2 model for x3).
    init_from: str | None = None
    precision: str = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    channels_last: bool = True  # channels_last memory layout on GPU
    compile: bool = False  # torch.compile the update (CUDA graphs on one GPU); first updates pay the compile
    seed: int = 0  # seed of initialisation and of each worker's RNG

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(self.lr_step >= 1, "lr_step", f"must be >= 1, got {self.lr_step}")
        require(0 < self.lr_gamma <= 1, "lr_gamma", f"must be in (0, 1], got {self.lr_gamma}")
        require(all(0 <= b < 1 for b in self.betas), "betas", f"must be in [0, 1), got {list(self.betas)}")
        require(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        require(self.total_steps >= 1, "total_steps", f"must be >= 1, got {self.total_steps}")
        require(self.val_every >= 1, "val_every", f"must be >= 1, got {self.val_every}")
        require(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        require(
            self.precision in ("auto", "fp32", "bf16"),
            "precision",
            f"must be auto, fp32 or bf16, got {self.precision!r}",
        )
        _require_location(self.init_from, "init_from", models=True)


@dataclass(frozen=True)
class WorkersConfig:
    """Ray Train scaling: how many workers and what each one holds."""

    # Ray Train workers (one GPU each with use_gpu): a fixed count, or [min, max] for an elastic group that starts
    # once min fit, grows towards max as nodes arrive and shrinks when nodes go (README "Run on a cluster").
    num_workers: int | tuple[int, int] = 1
    use_gpu: bool = False  # train on GPUs (NCCL); else CPU (gloo)
    cpus_per_worker: float = 1.0  # CPUs reserved per worker; Ray Data uses the rest for the patch stream
    placement_strategy: str = "PACK"  # PACK, SPREAD, STRICT_PACK or STRICT_SPREAD (workers on different nodes)
    # A custom resource each worker needs one unit of, e.g. spot_gpu: train only on the nodes that offer it
    # (cluster.yaml's gpu_l4_spot type). null: any node with the CPUs (and GPU) it needs.
    node_resource: str | None = None
    # With a [min, max] range: seconds between looks for more (or fewer) nodes while the group runs; each resize
    # restarts the group from the latest checkpoint, so not too often.
    resize_check_s: float = 60.0

    def __post_init__(self) -> None:
        count = self.num_workers
        if isinstance(count, tuple):
            require(
                len(count) == 2 and 1 <= count[0] <= count[1],
                "num_workers",
                f"expected a count or [min, max] with 1 <= min <= max, got {list(count)}",
            )
        else:
            require(count >= 1, "num_workers", f"must be >= 1, got {count}")
        require(self.cpus_per_worker > 0, "cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        strategies = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
        require(
            self.placement_strategy in strategies,
            "placement_strategy",
            f"must be one of {list(strategies)}, got {self.placement_strategy!r}",
        )
        require(
            not (self.elastic and self.placement_strategy.startswith("STRICT_")),
            "placement_strategy",
            f"{self.placement_strategy} cannot be honoured by an elastic group (Ray counts the workers that fit "
            "without the placement constraint and would retry a size it cannot place forever): use PACK or SPREAD "
            f"with num_workers [{self.min_workers}, {self.max_workers}]",
        )
        require(self.resize_check_s >= 0, "resize_check_s", f"must be >= 0, got {self.resize_check_s}")
        require(
            self.node_resource is None or (bool(self.node_resource) and self.node_resource not in ("CPU", "GPU")),
            "node_resource",
            f"must be a custom resource name (not CPU or GPU), got {self.node_resource!r}",
        )

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def elastic(self) -> bool:
        """Whether the group size may change during the run (a [min, max] range, even [n, n])."""
        return isinstance(self.num_workers, tuple)


@dataclass(frozen=True)
class RunConfig:
    """Where a training run keeps its checkpoints, and how it survives failures."""

    name: str = "edsr"  # run name: checkpoints go to storage_path/name
    # Local folder or ``s3://bucket/prefix``; re-running with the same name and storage resumes the run. None: runs/
    # in the project home ($EDSR_RAY_HOME, default ~/.edsr-ray).
    storage_path: str | None = None
    # Worker-group restarts from the latest checkpoint before the run fails (-1: forever). A node that vanishes
    # without notice counts here; a node drained for preemption counts against max_preemptions instead.
    max_failures: int = 2
    max_preemptions: int = -1  # restarts after announced preemptions (drained nodes) before failing (-1: no limit)
    num_to_keep: int = 2  # checkpoints kept, best by validation PSNR (the latest is always kept too)
    # Also checkpoint (without validating) when this many seconds passed since the last checkpoint: the work a
    # preemption or resize can lose is bounded by it. null: checkpoints only at validations.
    checkpoint_every_s: float | None = None

    def __post_init__(self) -> None:
        require(
            bool(self.name) and "/" not in self.name, "name", f"must be a non-empty name without '/', got {self.name!r}"
        )
        require(self.storage_path is None or bool(self.storage_path), "storage_path", "must not be empty")
        _require_location(self.storage_path, "storage_path")
        require(self.max_failures >= -1, "max_failures", f"must be >= -1 (-1: retry forever), got {self.max_failures}")
        require(self.num_to_keep >= 1, "num_to_keep", f"must be >= 1, got {self.num_to_keep}")
        require(
            self.max_preemptions >= -1,
            "max_preemptions",
            f"must be >= -1 (-1: no limit), got {self.max_preemptions}",
        )
        if self.checkpoint_every_s is not None:
            require(
                self.checkpoint_every_s > 0,
                "checkpoint_every_s",
                f"must be > 0 seconds or null, got {self.checkpoint_every_s}",
            )

    @property
    def location(self) -> str:
        """Where the run's checkpoints go: ``storage_path``, else ``runs/`` in the project home."""
        return self.storage_path or str(home.runs_dir())


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking. No URI: ``MLFLOW_TRACKING_URI`` if set, else a sqlite file in the embedded data directory."""

    tracking_uri: str | None = None  # MLflow server or store (default: MLFLOW_TRACKING_URI, else embedded sqlite)
    experiment: str = "edsr-ray"  # MLflow experiment name
    registered_model: str | None = None  # register the final and best models under this name
    log_images: bool = True  # log a bicubic | model | HR picture at every validation

    def __post_init__(self) -> None:
        require(bool(self.experiment), "experiment", "must not be empty")


@dataclass(frozen=True)
class InferenceConfig:
    """How images are upscaled by the one inference path (:class:`~edsr_ray.inference.Upscaler`): tiling,
    self-ensemble, precision. The settings of the batch job; Serve and evaluation have their own."""

    tile: int | None = None  # LR tile side; None: whole image when it fits
    self_ensemble: bool = False  # x8 flips/transposes averaged (EDSR+ / MDSR+)
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16

    def __post_init__(self) -> None:
        if self.tile is not None:
            require(self.tile >= 8, "tile", f"must be >= 8 or null, got {self.tile}")
        require(self.precision in PRECISIONS, "precision", f"must be one of {list(PRECISIONS)}, got {self.precision!r}")


@dataclass(frozen=True)
class ExperimentConfig:
    """A training run: model, data, optimisation, workers, run storage, tracking and object storage."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        # Each worker takes at least one patch of the global batch (shares may differ by one: training.update).
        require(
            self.workers.max_workers <= self.train.batch_size,
            "workers.num_workers",
            f"up to {self.workers.max_workers} workers cannot share a global batch of {self.train.batch_size} "
            "patches (train.batch_size): each worker needs at least one",
        )


# --------------------------------------------------------------------------------------------------------------------
# Loading


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _type_words(tp: Any) -> str:
    """``int`` -> "an integer", ``tuple[int, int]`` -> "a list of 2 integers" (for error messages)."""
    words = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings")}
    if tp in words:
        return words[tp][0]
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and args:
        count = "" if args[-1] is Ellipsis else f"{len(args)} "
        return f"a list of {count}{words.get(args[0], ('', 'values'))[1]}"
    return str(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/override value to the annotated type, or raise FieldError naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.strip().lower() in ("null", "none", "~") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for member in inner:  # the first member the value converts to, e.g. a count or a [min, max] pair
            try:
                return _coerce(value, member, key)
            except FieldError:
                if len(inner) == 1:
                    raise
        raise FieldError(key, f"expected {' or '.join(_type_words(m) for m in inner)}, got {_describe(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.strip().lower() in ("true", "yes", "on")
        raise FieldError(key, f"expected true or false, got {_describe(value)}")
    if tp is int:
        if isinstance(value, bool):
            raise FieldError(key, f"expected an integer, got {_describe(value)}")
        if isinstance(value, int):
            return value
        # YAML 1.1 reads ``2e5`` as a string; accept numbers written that way when they are whole.
        try:
            number = float(value) if isinstance(value, (str, float)) else None
        except ValueError:
            number = None
        if number is not None and number.is_integer():
            return int(number)
        raise FieldError(key, f"expected an integer, got {_describe(value)}")
    if tp is float:
        if isinstance(value, bool):
            raise FieldError(key, f"expected a number, got {_describe(value)}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise FieldError(key, f"expected a number, got {_describe(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise FieldError(key, f"expected a string, got {_describe(value)}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("[]() ").split(",") if v.strip()]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise FieldError(key, f"expected a list of {len(args)} values, got {_describe(list(value))}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # a bug in this module, not user input


def _build(cls: type[T], data: Any, path: str) -> T:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise FieldError(path, f"expected a mapping of keys, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise FieldError(where, f"unknown key; valid keys here are {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{path}.{name}" if path else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key)
        else:
            try:
                kwargs[name] = _coerce(value, tp, key)
            except FieldError as exc:
                raise FieldError(key, exc.message) from None
    try:
        return cls(**kwargs)
    except FieldError as exc:
        if "." in exc.key:  # a cross-section check already names its full key
            raise
        raise FieldError(f"{path}.{exc.key}" if path else exc.key, exc.message) from None


def from_dict(cls: type[T], data: Mapping[str, Any] | None, *, source: str = "<dict>") -> T:
    """Build (and validate) the dataclass ``cls`` from plain data; errors name ``source`` and the dotted key."""
    try:
        return _build(cls, data, "")
    except FieldError as exc:
        raise ConfigError(f"{source}: {exc.key}: {exc.message}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) that survives pickling, JSON and YAML; inverse of :func:`from_dict`."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def flatten(cfg: Any) -> dict[str, Any]:
    """Dotted ``section.key -> value`` pairs, e.g. for MLflow params."""
    out: dict[str, Any] = {}

    def walk(prefix: str, d: Mapping[str, Any]) -> None:
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else k
            if isinstance(v, Mapping):
                walk(key, v)
            else:
                out[key] = v

    walk("", to_dict(cfg))
    return out


def apply_overrides(data: dict[str, Any], overrides: Iterable[str], *, source: str) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to nested plain data, returning a new dict."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        dotted = dotted.strip()
        if not dotted or any(not part for part in dotted.split(".")):
            raise ConfigError(f"{source}: override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: override {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def read_config_text(path: str | os.PathLike[str], what: str) -> str:
    """The UTF-8 text of a YAML config file (``what``: "config file", ...), or a ConfigError naming the file.

    Read like any input (:func:`edsr_ray.storage.read_bytes`): a FIFO or device named like a config fails at once
    instead of blocking, and a file over :data:`MAX_CONFIG_BYTES` is refused.
    """
    source = os.fspath(path)
    local = Path(source).expanduser()
    try:
        data = storage.read_bytes(local, max_bytes=MAX_CONFIG_BYTES)
    except storage.NotFoundError:
        raise ConfigError(f"{source}: {what} not found") from None
    except OSError as exc:  # the message names the file first: keep one name, the caller's
        raise ConfigError(f"{source}: {str(exc).removeprefix(f'{local}: ')}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: {what} is not UTF-8 text") from None


def load_config(
    path: str | os.PathLike[str] | None, overrides: Iterable[str] = (), cls: type[T] = ExperimentConfig
) -> T:
    """Load ``path`` (YAML) into ``cls`` with dotted overrides applied; every error names the file and key."""
    source = str(path) if path is not None else "<defaults>"
    data: Any = {}
    if path is not None:
        text = read_config_text(path, "config file")
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    overrides = list(overrides)
    if overrides:
        data = apply_overrides(data, overrides, source=f"{source} (command-line overrides)")
    return from_dict(cls, data, source=source)


# --------------------------------------------------------------------------------------------------------------------
# Reference documentation, generated from the dataclasses themselves (the README embeds it; a test keeps it current)

SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "workers": WorkersConfig,
    "run": RunConfig,
    "tracking": TrackingConfig,
    "storage": StorageConfig,
}


def _field_docs(cls: type) -> dict[str, str]:
    """Comments written beside or above each field in the class body."""
    import inspect
    import re

    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("# ").strip())
            continue
        match = re.match(r"(\w+): [^=]+=.*?(?:#\s*(.*))?$", stripped)
        if match:
            parts = [*pending, match.group(2) or ""]
            docs[match.group(1)] = " ".join(p for p in parts if p).replace("``", "`").replace("|", "\\|")
        pending = []
    return docs


def reference_markdown() -> str:
    """The configuration reference: every section, key, type, default and meaning."""

    def type_name(tp: Any) -> str:
        text = str(tp).replace("typing.", "").replace(" | None", " or null")
        return {
            "<class 'int'>": "int",
            "<class 'float'>": "float",
            "<class 'str'>": "str",
            "<class 'bool'>": "bool",
        }.get(text, text)

    lines: list[str] = []
    for section, cls in SECTIONS.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        lines += [f"**`{section}`**: {doc}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        hints = typing.get_type_hints(cls)
        docs = _field_docs(cls)
        defaults = cls()
        for f in dataclasses.fields(cls):
            default = getattr(defaults, f.name)
            shown = list(default) if isinstance(default, tuple) else default
            value = "null" if shown is None else yaml.safe_dump(shown, default_flow_style=True).strip()
            value = value.removesuffix("\n...").strip()
            lines.append(f"| `{f.name}` | {type_name(hints[f.name])} | `{value}` | {docs.get(f.name, '')} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


README_START, README_END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def splice_reference(readme: str) -> str:
    """``readme`` with the text between the config-reference markers replaced by :func:`reference_markdown`."""
    start, end = readme.index(README_START) + len(README_START), readme.index(README_END)
    return readme[:start] + "\n" + reference_markdown() + readme[end:]


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--write"]:  # python -m edsr_ray.config --write README.md
        path = Path(sys.argv[2])
        path.write_text(splice_reference(path.read_text()))
    else:
        print(reference_markdown(), end="")
