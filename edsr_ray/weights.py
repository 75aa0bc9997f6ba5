"""Weight files: reading them safely into a network built for them, the project's checkpoints, initialisation from
other weights, and where a model source points (local file or folder, ``s3://``, MLflow ``models:/`` / ``runs:/``).

Loading never runs code from a file: every payload goes through ``torch.load(..., weights_only=True)``, and the
architecture is read off the tensor names and shapes (:func:`infer_model_config`) instead of being repeated as flags.
The released ``.pt`` files are bare state dicts; the project's own checkpoint format (:func:`model_checkpoint`)
stores the full :class:`~edsr_ray.config.ModelConfig` beside the weights, because ``res_scale`` cannot be recovered
from weights. The networks themselves are :mod:`edsr_ray.models`.

A model source is resolved in one place (:func:`read_model_source`): a local path (a ``.pt`` file, or a checkpoint
folder holding ``model.pt``), an ``s3://`` object or checkpoint prefix through :mod:`edsr_ray.storage`, or an MLflow
URI whose artifacts :mod:`edsr_ray.tracking` downloads. :func:`load_model`, :func:`load_matching` and
:func:`init_from` all read through it.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import yaml
from torch import nn

from edsr_ray import storage as store
from edsr_ray.config import ModelConfig, from_dict, to_dict
from edsr_ray.errors import ConfigError, ModelLoadError
from edsr_ray.models import EDSR, MDSR, build_model, channel_mean, config_of, unwrap_model
from edsr_ray.storage import StorageConfig

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "edsr-ray/model-v1"
# An MLflow model logged by this project (edsr_ray.mlflow_model) names its loader and its weights file in MLmodel.
LOADER_MODULE = "edsr_ray.mlflow_model"
MLMODEL = "MLmodel"
PYFUNC = "python_function"
# Keys of the fixed (not trained) mean-shift layers.
_MEAN_SHIFT_KEYS = ("sub_mean.weight", "sub_mean.bias", "add_mean.weight", "add_mean.bias")
# Wrappers other tools put around a state dict (no "format" key); the first one holding tensors is used.
_WRAPPER_KEYS = ("state_dict", "model", "params_ema", "params")

ModelSource = str | os.PathLike | Mapping[str, Any]


# --------------------------------------------------------------------------------------------------------------------
# Reading weights safely


def _shape(t: Any) -> str:
    return f"[{', '.join(str(d) for d in t.shape)}]" if isinstance(t, torch.Tensor) else type(t).__name__


def _describe_found(sd: Mapping[str, Any], limit: int = 6) -> str:
    items = list(sd.items())
    shown = ", ".join(f"{k} {_shape(v)}" for k, v in items[:limit])
    more = f", ... ({len(items)} keys in all)" if len(items) > limit else ""
    return (shown + more) if items else "no keys"


_EXPECTED_LAYOUT = (
    "expected an EDSR state dict (sub_mean.weight [C, C, 1, 1], head.0.weight [F, C, 3, 3], "
    "body.{i}.body.0.weight [F, F, 3, 3], body.{R}.weight, tail.0.0.weight [4F or 9F, F, 3, 3], "
    "tail.1.weight [C, F, 3, 3]) or an MDSR state dict (head.0.weight, pre_process.{i}.0.body.0.weight "
    "[F, F, 5, 5], body.{i}.body.0.weight, upsample.{i}.0.weight, tail.0.weight [C, F, 3, 3])"
)


def _strip_prefixes(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Remove ``module.`` (DDP / DataParallel) and ``_orig_mod.`` (torch.compile) prefixes shared by every key."""
    out = dict(sd)
    changed = True
    while changed and out:
        changed = False
        for prefix in ("module.", "_orig_mod."):
            if all(isinstance(k, str) and k.startswith(prefix) for k in out):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                changed = True
    return out


def _count_indexed(sd: Mapping[str, Any], template: str) -> int:
    n = 0
    while template.format(n) in sd:
        n += 1
    return n


def _upsampler_scale(sd: Mapping[str, Any], prefix: str, n_feats: int, source: str) -> int:
    w = sd.get(f"{prefix}.0.weight")
    if not isinstance(w, torch.Tensor) or w.dim() != 4:
        raise ModelLoadError(f"{source}: missing upsampler weight {prefix}.0.weight; {_EXPECTED_LAYOUT}")
    if w.shape[0] == 9 * n_feats:
        return 3
    if w.shape[0] == 4 * n_feats:
        return 4 if f"{prefix}.2.weight" in sd else 2
    raise ModelLoadError(
        f"{source}: {prefix}.0.weight has shape {_shape(w)}; an upsampler for {n_feats} features has "
        f"{4 * n_feats} (x2, x4) or {9 * n_feats} (x3) output channels"
    )


def _infer_rgb_range(sd: Mapping[str, Any], n_colors: int, source: str) -> int:
    bias = sd.get("sub_mean.bias")
    if not isinstance(bias, torch.Tensor) or bias.numel() != n_colors:
        return 255  # the layout check reports the missing/odd key with the rest
    ratio = -bias.detach().double().cpu() / torch.tensor(channel_mean(n_colors), dtype=torch.float64)
    value = float(ratio.mean())
    consistent = bool(torch.allclose(ratio, torch.full_like(ratio, value), rtol=1e-3))
    if not consistent or value <= 0 or abs(value - round(value)) > 1e-3 * max(value, 1.0):
        raise ModelLoadError(
            f"{source}: sub_mean.bias {[round(v, 4) for v in bias.tolist()]} is not -rgb_range x the DIV2K mean "
            f"{list(channel_mean(n_colors))} for a whole-number rgb_range "
            f"(ratios {[round(v, 4) for v in ratio.tolist()]})"
        )
    return round(value)


def _check_layout(sd: Mapping[str, Any], cfg: ModelConfig, source: str) -> None:
    """Raise ModelLoadError unless ``sd`` has exactly the keys and shapes of the network described by ``cfg``."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        expected = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [
        k for k in expected if k in sd and (not isinstance(sd[k], torch.Tensor) or tuple(sd[k].shape) != expected[k])
    ]
    if not (missing or unexpected or wrong):
        return
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys: " + ", ".join(f"{k} {list(expected[k])}" for k in missing[:5]))
    if unexpected:
        shown = ", ".join(f"{k} {_shape(sd[k])}" for k in unexpected[:5])
        problems.append(f"{len(unexpected)} unexpected keys: {shown}")
    if wrong:
        problems.append(
            "wrong shapes: " + ", ".join(f"{k} is {_shape(sd[k])}, expected {list(expected[k])}" for k in wrong[:5])
        )
    raise ModelLoadError(f"{source}: does not match the layout of {_summary(cfg)}: " + "; ".join(problems))


def _summary(cfg: ModelConfig) -> str:
    scales = "/".join(f"x{s}" for s in cfg.scales)
    return (
        f"{cfg.arch.upper()} {scales} (n_resblocks={cfg.n_resblocks}, n_feats={cfg.n_feats}, "
        f"res_scale={cfg.res_scale}, n_colors={cfg.n_colors}, rgb_range={cfg.rgb_range})"
    )


def infer_model_config(
    state_dict: Mapping[str, Any], *, res_scale: float | None = None, source: str = "<state dict>"
) -> ModelConfig:
    """Read the architecture (EDSR/MDSR, blocks, features, scales, colours, rgb_range) off a state dict's keys/shapes.

    ``res_scale`` is not stored in weights: unless given it follows the release convention, 0.1 for 256 features and
    1 otherwise. A ``module.`` prefix is ignored. Anything else than a complete EDSR/MDSR state dict raises
    :class:`ModelLoadError` naming ``source``, what was expected and what was found.
    """
    if not isinstance(state_dict, Mapping):
        raise ModelLoadError(
            f"{source}: expected a state dict (parameter name -> tensor), got {type(state_dict).__name__}"
        )
    sd = _strip_prefixes(state_dict)
    if "pre_process.0.0.body.0.weight" in sd or "upsample.0.0.weight" in sd:
        arch = "mdsr"
    elif "tail.0.0.weight" in sd:
        arch = "edsr"
    else:
        raise ModelLoadError(f"{source}: not an EDSR/MDSR state dict: {_EXPECTED_LAYOUT}; found {_describe_found(sd)}")
    head = sd.get("head.0.weight")
    if not isinstance(head, torch.Tensor) or head.dim() != 4:
        raise ModelLoadError(
            f"{source}: looks like {arch.upper()} but head.0.weight is "
            f"{_shape(head) if head is not None else 'missing'}; {_EXPECTED_LAYOUT}; found {_describe_found(sd)}"
        )
    n_feats, n_colors = int(head.shape[0]), int(head.shape[1])
    n_resblocks = _count_indexed(sd, "body.{}.body.0.weight")
    if arch == "edsr":
        scales: tuple[int, ...] = (_upsampler_scale(sd, "tail.0", n_feats, source),)
    else:
        n_branches = _count_indexed(sd, "upsample.{}.0.weight")
        scales = tuple(_upsampler_scale(sd, f"upsample.{i}", n_feats, source) for i in range(n_branches))
    if res_scale is None:
        res_scale = 0.1 if n_feats == 256 else 1.0
    values = {
        "arch": arch,
        "n_resblocks": n_resblocks,
        "n_feats": n_feats,
        "scales": scales,
        "res_scale": res_scale,
        "n_colors": n_colors,
        "rgb_range": _infer_rgb_range(sd, n_colors, source),
    }
    try:
        cfg = from_dict(ModelConfig, values, source=source)
    except ConfigError as exc:
        raise ModelLoadError(f"unsupported architecture read from the weights: {exc}") from None
    _check_layout(sd, cfg, source)
    return cfg


def _torch_load(data: bytes, name: str, map_location: Any) -> Any:
    """``torch.load`` restricted to tensors and plain containers; every failure is a ModelLoadError naming ``name``."""
    if not data:
        raise ModelLoadError(f"{name}: the file is empty (0 bytes); expected PyTorch weights saved with torch.save")
    try:
        with warnings.catch_warnings():
            # Plain pickles trigger a protocol warning before being refused below; the error says it all.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found:
            raise ModelLoadError(
                f"{name}: refused: the file contains a pickled Python object ({found.group(1)}), and this loader "
                "refuses to unpickle arbitrary objects because that can run code. Nothing was executed. Save the "
                "weights alone, e.g. torch.save(model.state_dict(), path)"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
        reason = detail.group(1).strip()[:200] if detail else "unrecognised content"
        raise ModelLoadError(
            f"{name}: not a PyTorch weights file ({_content(data)}): the weights-only loader rejected it ({reason}); "
            "nothing was executed"
        ) from None
    except Exception as exc:  # torch raises many types (RuntimeError, EOFError, KeyError, ...) for foreign bytes
        raise ModelLoadError(
            f"{name}: not a PyTorch weights file ({_content(data)}): {type(exc).__name__}: {str(exc)[:200]}"
        ) from exc


def _content(data: bytes) -> str:
    """What the bytes are ("a PNG image", "1234 bytes of UTF-8 text"), never the bytes themselves."""
    from edsr_ray.codecs import sniff

    return sniff(data).description


def _pick_file_in_dir(path: Path) -> Path:
    """``model.pt`` in a (Ray Train / MLflow) checkpoint directory, or its only ``.pt``/``.pth`` file."""
    candidate = path / "model.pt"
    if candidate.is_file():
        return candidate
    entries = sorted(p.name for p in path.iterdir())
    weights = [n for n in entries if n.endswith((".pt", ".pth"))]
    if len(weights) == 1:
        return path / weights[0]
    listing = ", ".join(entries[:10]) + (" ..." if len(entries) > 10 else "") if entries else "nothing"
    raise ModelLoadError(f"{path}: directory has no model.pt (nor a single .pt/.pth file); it holds {listing}")


# --------------------------------------------------------------------------------------------------------------------
# Finding the weights in a model folder or prefix


def data_entry(mlmodel: bytes | str, name: str) -> str:
    """The weights' path, relative to the model folder, named by an ``MLmodel`` document logged by this project."""
    try:
        doc = yaml.safe_load(mlmodel)
    except yaml.YAMLError as exc:
        raise ModelLoadError(f"{name}: not a readable MLmodel file: {str(exc).splitlines()[0]}") from None
    flavor = (doc.get("flavors") or {}).get(PYFUNC) if isinstance(doc, dict) else None
    if not isinstance(flavor, dict):
        raise ModelLoadError(f"{name}: an MLflow model without a {PYFUNC} flavour; not an EDSR/MDSR model")
    loader, data = flavor.get("loader_module"), flavor.get("data")
    if loader != LOADER_MODULE:
        raise ModelLoadError(
            f"{name}: an MLflow model of another kind (loader {loader!r}); this loader reads models logged by "
            f"edsr-ray (loader {LOADER_MODULE!r}), or a folder holding model.pt"
        )
    if not isinstance(data, str) or not data or PurePosixPath(data).is_absolute() or ".." in PurePosixPath(data).parts:
        raise ModelLoadError(f"{name}: its {PYFUNC} flavour names no weights file inside the model (data: {data!r})")
    return data


def weights_path(folder: str | os.PathLike[str]) -> Path:
    """The weights file in a model folder: the one ``MLmodel`` names, else ``model.pt`` or the single ``.pt``."""
    folder = Path(folder)
    mlmodel = folder / MLMODEL
    if mlmodel.is_file():
        return folder / data_entry(store.read_bytes(mlmodel), str(mlmodel))
    return _pick_file_in_dir(folder)


def s3_weights_uri(prefix: str, cfg: StorageConfig | None = None) -> str | None:
    """The weights URI named by ``prefix/MLmodel`` (an MLflow model stored on S3), or None when there is none."""
    mlmodel = store.join(prefix, MLMODEL)
    try:
        text = store.read_bytes(mlmodel, cfg)
    except store.NotFoundError:
        return None
    return store.join(prefix, data_entry(text, mlmodel))


def _read_local(
    path: str | os.PathLike, storage: StorageConfig | None, display: str | None = None
) -> tuple[bytes, str]:
    p = store.local_path(path)
    if p.is_dir():
        p = weights_path(p)  # an MLflow model folder names its weights in MLmodel
    name = display or str(p)
    if not os.path.lexists(p):
        raise ModelLoadError(f"{name}: no such file")
    try:
        # A FIFO, device or folder named like a weights file fails here by name instead of blocking the read.
        return store.read_bytes(p, storage), name
    except OSError as exc:
        raise ModelLoadError(f"cannot read the weights file: {exc}") from exc


def read_model_source(source: str, storage: StorageConfig | None = None) -> tuple[bytes, str]:
    """(the weights file's bytes, its name for messages) for a model source: a local ``.pt`` file or a checkpoint
    folder holding ``model.pt``; an ``s3://`` object, or a checkpoint prefix holding ``model.pt``; an MLflow
    ``models:/`` or ``runs:/`` URI (its artifacts are downloaded to a temporary folder and read from there). Any other
    scheme is a :class:`~edsr_ray.errors.LocationError`; a missing or unreadable file a :class:`ModelLoadError`."""
    kind = store.location_kind(source, store.MODEL_LOCATIONS, what="model source")
    if kind == store.MLFLOW:
        from edsr_ray.tracking import download_model_uri  # MLflow is only imported when such a URI is used

        with tempfile.TemporaryDirectory(prefix="edsr-model-") as tmp:  # the bytes are read; nothing is left behind
            data, name = _read_local(download_model_uri(source, dst_path=tmp), storage)
        return data, f"{source} ({name})"
    if kind == store.S3:
        named = None if source.endswith((".pt", ".pth")) else s3_weights_uri(source, storage)  # an MLflow model
        if named:
            source = named
        elif source.endswith("/"):
            source = store.join(source, "model.pt")
        elif not source.endswith((".pt", ".pth")):
            # A Ray Train checkpoint "directory" on S3 is a prefix holding model.pt.
            inner = store.join(source, "model.pt")
            if store.exists(inner, storage):
                source = inner
        return store.read_bytes(source, storage), source
    return _read_local(source, storage)


def _unpack(obj: Any, name: str) -> tuple[dict[str, Any], ModelConfig | None]:
    """Split a loaded payload into (state dict, stored config or None)."""
    if not isinstance(obj, Mapping):
        raise ModelLoadError(
            f"{name}: expected a state dict (parameter name -> tensor) or an {CHECKPOINT_FORMAT} checkpoint, "
            f"found a {type(obj).__name__}"
        )
    fmt = obj.get("format")
    if fmt is not None:
        if fmt != CHECKPOINT_FORMAT:
            raise ModelLoadError(
                f"{name}: unknown checkpoint format {fmt!r}; expected {CHECKPOINT_FORMAT!r} or a bare state dict"
            )
        sd, cfg_data = obj.get("state_dict"), obj.get("model_config")
        if not isinstance(sd, Mapping) or not isinstance(cfg_data, Mapping):
            raise ModelLoadError(
                f"{name}: an {CHECKPOINT_FORMAT} checkpoint needs 'state_dict' and 'model_config' mappings"
            )
        try:
            cfg = from_dict(ModelConfig, cfg_data, source=f"{name} (model_config)")
        except ConfigError as exc:
            raise ModelLoadError(str(exc)) from None
        return _strip_prefixes(sd), cfg
    if obj and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                logger.info("%s: using the state dict stored under %r", name, key)
                return _strip_prefixes(inner), None
        raise ModelLoadError(f"{name}: not an EDSR/MDSR state dict: {_EXPECTED_LAYOUT}; found {_describe_found(obj)}")
    return _strip_prefixes(obj), None


def _read_payload(
    source: ModelSource, map_location: Any, storage: StorageConfig | None
) -> tuple[dict[str, Any], ModelConfig | None, str, bool]:
    """(state dict, stored config, display name, whether the tensors belong to the caller)."""
    if isinstance(source, Mapping):
        sd, cfg = _unpack(source, "<dict>")
        return sd, cfg, "<dict>", True
    if not isinstance(source, (str, os.PathLike)):
        raise ModelLoadError(
            f"unsupported model source {type(source).__name__}; give a path, s3:// URI, models:/ or runs:/ URI, "
            "or a state dict"
        )
    data, name = read_model_source(os.fspath(source), storage)
    sd, cfg = _unpack(_torch_load(data, name, map_location), name)
    return sd, cfg, name, False


def load_model(
    source: ModelSource,
    *,
    res_scale: float | None = None,
    map_location: Any = "cpu",
    storage: StorageConfig | None = None,
) -> EDSR | MDSR:
    """Load weights from ``source`` into a network built for them; returned in eval mode with ``.config`` set.

    ``source``: a local ``.pt`` file (official bare state dict or project checkpoint), a directory holding ``model.pt``
    (Ray Train checkpoint), an ``s3://`` URI (read with :mod:`edsr_ray.storage` using ``storage``, a
    :class:`~edsr_ray.storage.StorageConfig` or None for the standard AWS environment), an MLflow ``models:/`` or
    ``runs:/`` URI, or an in-memory state dict / checkpoint dict. Bare state dicts take ``res_scale`` from the
    argument or the convention (see :func:`infer_model_config`); project checkpoints carry their own, which an
    explicit ``res_scale`` overrides.
    """
    sd, cfg, name, owned_by_caller = _read_payload(source, map_location, storage)
    if cfg is None:
        cfg = infer_model_config(sd, res_scale=res_scale, source=name)
    else:
        if res_scale is not None and res_scale != cfg.res_scale:
            logger.warning("%s: overriding the stored res_scale %s with %s", name, cfg.res_scale, res_scale)
            cfg = dataclasses.replace(cfg, res_scale=float(res_scale))
        _check_layout(sd, cfg, name)
    device = map_location if isinstance(map_location, (str, torch.device)) else None
    tensors = {
        # float32 like the released weights; copies when the tensors are the caller's, so the model never aliases them.
        k: v.detach().to(device=device, dtype=torch.float32 if v.is_floating_point() else v.dtype, copy=owned_by_caller)
        for k, v in sd.items()
    }
    with torch.device("meta"):  # no random initialisation, no second copy of the weights
        model = build_model(cfg)
    model.load_state_dict(tensors, strict=True, assign=True)
    model.eval()
    logger.info("loaded %s from %s", _summary(cfg), name)
    return model


# --------------------------------------------------------------------------------------------------------------------
# Saving and initialisation


def model_checkpoint(model: nn.Module) -> dict[str, Any]:
    """The project's checkpoint: format tag, plain-dict model config and CPU weights (all weights-only loadable)."""
    inner = unwrap_model(model)
    return {
        "format": CHECKPOINT_FORMAT,
        "model_config": to_dict(config_of(inner)),
        "state_dict": {k: v.detach().cpu() for k, v in inner.state_dict().items()},
    }


def save_model(model: nn.Module, path: str | os.PathLike, *, storage: StorageConfig | None = None) -> str:
    """Write :func:`model_checkpoint` to ``path`` atomically (temp file + rename, or one S3 PUT); returns the path."""
    ckpt = model_checkpoint(model)
    target = os.fspath(path)
    if store.location_kind(path, store.DATA_LOCATIONS, what="model destination") == store.S3:
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        store.write_bytes(target, buf.getvalue(), storage)
        return target
    p = store.local_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    # The temp file sits beside the target so the rename is atomic and nothing is written elsewhere.
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return str(p)


@dataclass
class InitReport:
    """What :func:`load_matching` did: tensors copied, model tensors left at init, source tensors not used."""

    copied: list[str] = field(default_factory=list)
    left_at_init: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # in the source but absent from the model or of another shape


def _body_arch(sd: Mapping[str, Any]) -> tuple[int, int] | None:
    head = sd.get("head.0.weight")
    if not isinstance(head, torch.Tensor) or head.dim() != 4:
        return None
    return _count_indexed(sd, "body.{}.body.0.weight"), int(head.shape[0])


def load_matching(
    model: nn.Module,
    source_or_state_dict: ModelSource,
    *,
    map_location: Any = "cpu",
    storage: StorageConfig | None = None,
) -> InitReport:
    """Copy every source tensor whose name and shape match into ``model`` (e.g. x2 weights into an x3/x4 model).

    The source is read like :func:`load_model` (same safe path). Into x3 this leaves ``tail.0.0`` at init, into x4
    ``tail.0.2``. Mean-shift tensors are fixed by the model's own ``rgb_range``; they are copied only when equal.
    Raises :class:`ModelLoadError` when the bodies differ (n_resblocks / n_feats) or nothing matches.
    """
    target = unwrap_model(model)
    sd, _, name, _ = _read_payload(source_or_state_dict, map_location, storage)
    own = target.state_dict()
    src_arch, own_arch = _body_arch(sd), _body_arch(own)
    if src_arch and own_arch and src_arch != own_arch:
        raise ModelLoadError(
            f"{name}: cannot initialise from it: its body has n_resblocks={src_arch[0]}, n_feats={src_arch[1]} "
            f"but the model's has n_resblocks={own_arch[0]}, n_feats={own_arch[1]}"
        )
    merged = dict(own)
    report = InitReport()
    for key, value in sd.items():
        mine = own.get(key)
        if not isinstance(value, torch.Tensor) or mine is None or tuple(value.shape) != tuple(mine.shape):
            report.skipped.append(key)
        elif key in _MEAN_SHIFT_KEYS and not torch.equal(value.detach().float().cpu(), mine.detach().float().cpu()):
            logger.warning("%s: %s differs (another rgb_range?); keeping the model's own mean shift", name, key)
            report.skipped.append(key)
        else:
            merged[key] = value.detach().to(device=mine.device, dtype=mine.dtype)
    copied = set(sd) - set(report.skipped)
    report.copied = [k for k in own if k in copied]
    report.left_at_init = [k for k in own if k not in copied]
    if not report.copied:
        raise ModelLoadError(
            f"{name}: no tensor matches the model by name and shape; found {_describe_found(sd)}; "
            f"the model has {_describe_found(own)}"
        )
    target.load_state_dict(merged, strict=True)
    return report


def init_from(
    model: nn.Module, source: ModelSource, *, map_location: Any = "cpu", storage: StorageConfig | None = None
) -> InitReport:
    """:func:`load_matching` from a path/URI/dict, logging what was copied and what was left at init."""
    report = load_matching(model, source, map_location=map_location, storage=storage)
    logger.info(
        "initialised from %s: copied %d tensors; left at init: %s; unused from the source: %s",
        source if not isinstance(source, Mapping) else "<dict>",
        len(report.copied),
        ", ".join(report.left_at_init) or "none",
        ", ".join(report.skipped) or "none",
    )
    return report


__all__ = [
    "CHECKPOINT_FORMAT",
    "InitReport",
    "ModelSource",
    "infer_model_config",
    "init_from",
    "load_matching",
    "load_model",
    "model_checkpoint",
    "read_model_source",
    "save_model",
]
