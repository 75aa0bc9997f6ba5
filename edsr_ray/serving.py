"""Ray Serve upscaling service: settings, request checks, and the two deployments behind ``serve run serve.app:app``.

Layout. ``EdsrIngress`` (FastAPI) only reads, checks, decodes, resizes to the size asked for (``outscale``, ``width``,
``height``: :mod:`edsr_ray.outsize`) and encodes: it enforces the byte and pixel limits, the optional bearer token
and the parameters, and answers every client mistake with a 4xx and ``{"error": ...}``.
``EdsrModel`` holds the networks: ``@serve.multiplexed`` keeps up to ``max_models_per_replica`` of the configured
models per replica (the model id is the model's name; one MDSR serves all its scales), and ``@serve.batch`` stacks
small images of equal size into one forward pass. Larger images run one at a time through the shared
:class:`~edsr_ray.inference.Upscaler`, which tiles them when they do not fit (or at ``tile``).

Short video clips go to the same endpoint: the ingress probes them against the clip limits (``max_clip_frames``,
``max_clip_seconds``, ``max_clip_output_pixels``, and ``max_pixels`` per frame; over one, a 413 that names the limit
and points at the batch job), decodes and encodes them (:func:`edsr_ray.video.upscale_clip`, audio and subtitles
copied), and sends the frames to ``EdsrModel`` at most ``max_batch_size`` at a time.

Settings are a frozen :class:`ServeSettings` built from the application builder's arguments (``serve run
serve.app:app models.x2=s3://... max_batch_size=16``) or the ``args`` of ``serve/config.yaml``; unknown keys and bad
values raise :class:`~edsr_ray.errors.ConfigError` naming the key before anything is deployed.
"""

# No ``from __future__ import annotations`` here: Serve pickles the ingress class by value, and FastAPI must resolve
# the route functions' annotations from the objects themselves, not from names in this module's globals.
import asyncio
import collections
import dataclasses
import hmac
import logging
import os
import re
import threading
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import yaml
from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from edsr_ray import __version__
from edsr_ray.codecs import OUTPUT_FORMATS, SAME_FORMAT
from edsr_ray.config import PRECISIONS, SCALES, from_dict, read_config_text, to_dict
from edsr_ray.errors import ConfigError, EdsrRayError, FieldError, ImageError, ImageTooLargeError, LocationError
from edsr_ray.outsize import OutputSize, check_output, output_pixel_limit, resize_decoded
from edsr_ray.storage import MODEL_LOCATIONS, StorageConfig, location_kind

logger = logging.getLogger(__name__)

INGRESS_DEPLOYMENT = "EdsrIngress"
MODEL_DEPLOYMENT = "EdsrModel"
CONFIG_ENV = "EDSR_SERVE_CONFIG"  # YAML file of settings read by the application builder when given no `config` arg
# Upload formats the service decodes (edsr_ray.codecs names): a service that takes untrusted uploads should not expose
# every decoder Pillow carries, and a known signature separates "not an image" (415) from "a broken image" (400).
ACCEPTED_FORMATS = ("png", "jpeg", "webp", "gif", "bmp", "tiff")
# Video clips are upscaled in parts of at most this many bytes of upscaled frames (bounds a request's memory).
CLIP_PART_BYTES = 64 << 20
BATCH_JOB_HINT = "longer or larger videos are upscaled by the batch job (jobs/upscale.py)"
# Model names are URL query values, multiplexed model ids and metric tag values: keep them plain.
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


# --------------------------------------------------------------------------------------------------------------------
# Settings


class _InvalidSetting(ConfigError):
    """Raised by ``ServeSettings.__post_init__``; the loaders prefix the source."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise _InvalidSetting(f"{key}: {message}")


@dataclass(frozen=True)
class ServeSettings:
    """Everything the service needs; passed to the replicas as a plain dict (:func:`~edsr_ray.config.to_dict`)."""

    # Model name → weights source (local path, s3:// URI, models:/ or runs:/ MLflow URI), e.g. the official x2/x3/x4
    # files under three names, or one MDSR under one name for all scales.
    models: dict[str, str] = field(default_factory=dict)
    # Used when a request names no model (and it upscales by the requested scale); None: the first listed model.
    default_model: str | None = None
    # Limits. The byte limit bounds memory before anything is parsed; the pixel limit (input pixels) is checked on
    # the header before decoding and bounds the output too (x4 of 4 MP is a 64 MP, 192 MB result).
    max_body_bytes: int = 32 << 20
    max_pixels: int = 4_000_000
    body_timeout_s: float = 30.0  # reading the request body (slow clients get 408)
    # Video clips: frames, seconds, and frames x output pixels (the work and the answer grow with it); longer videos
    # are the batch job's.
    max_clip_frames: int = 240
    max_clip_seconds: float = 10.0
    max_clip_output_pixels: int = 500_000_000
    request_timeout_s: float = 120.0  # each call to the model replicas: loading a model, upscaling (then 504)
    # Inference (the shared Upscaler): LR tile side (None: whole images when they fit), precision.
    tile: int | None = None
    precision: str = "auto"
    # Batching: images of at most batch_max_pixels are grouped by (model, scale, size) into batches of up to
    # max_batch_size, waiting at most batch_wait_timeout_s for a batch to fill. max_batch_size 1 turns batching off.
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01
    batch_max_pixels: int = 65_536
    # Model replicas.
    max_ongoing_requests: int = 16
    max_models_per_replica: int = 3
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    # Ingress replicas (decode/encode only; they need CPU, not GPU).
    ingress_num_cpus: float = 1.0
    ingress_max_ongoing_requests: int = 64
    # Name of the environment variable holding the bearer token (never the token itself); None: no auth.
    auth_token_env: str | None = None
    # Object storage for s3:// model sources (credentials come from the environment, never from here).
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        _check(isinstance(self.models, Mapping), "models", f"expected a mapping of name → source, got {self.models!r}")
        for name, source in self.models.items():
            _check(
                isinstance(name, str) and bool(_MODEL_NAME.match(name)),
                f"models.{name}",
                "model names must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
            )
            _check(
                isinstance(source, str) and bool(source.strip()),
                f"models.{name}",
                f"expected a weights path or URI, got {source!r}",
            )
            try:
                location_kind(source, MODEL_LOCATIONS)
            except LocationError as exc:
                raise _InvalidSetting(f"models.{name}: {exc}") from None
        object.__setattr__(self, "models", dict(self.models))  # a private copy: the settings stay as validated
        if self.default_model is not None:
            _check(
                self.default_model in self.models,
                "default_model",
                f"{self.default_model!r} is not one of the configured models {sorted(self.models)}",
            )
        for key in ("max_body_bytes", "max_pixels", "batch_max_pixels", "max_ongoing_requests", "max_clip_frames"):
            _check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("max_clip_seconds", "max_clip_output_pixels"):
            _check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
            _check(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")
        for key in ("body_timeout_s", "request_timeout_s"):
            _check(getattr(self, key) > 0, key, f"must be > 0 seconds, got {getattr(self, key)}")
        if self.tile is not None:
            _check(self.tile >= 8, "tile", f"must be >= 8 or null, got {self.tile}")
        _check(self.precision in PRECISIONS, "precision", f"must be one of {list(PRECISIONS)}, got {self.precision!r}")
        _check(self.max_batch_size >= 1, "max_batch_size", f"must be >= 1 (1: no batching), got {self.max_batch_size}")
        _check(
            self.batch_wait_timeout_s >= 0,
            "batch_wait_timeout_s",
            f"must be >= 0 seconds, got {self.batch_wait_timeout_s}",
        )
        # Serve hands a replica at most max_ongoing_requests at a time: fewer than a batch and batches never fill.
        _check(
            self.max_ongoing_requests >= self.max_batch_size,
            "max_ongoing_requests",
            f"must be >= max_batch_size ({self.max_batch_size}), got {self.max_ongoing_requests}",
        )
        _check(
            self.max_models_per_replica >= 1,
            "max_models_per_replica",
            f"must be >= 1, got {self.max_models_per_replica}",
        )
        for key in ("num_gpus", "num_cpus", "ingress_num_cpus"):
            _check(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        _check(
            self.ingress_max_ongoing_requests >= 1,
            "ingress_max_ongoing_requests",
            f"must be >= 1, got {self.ingress_max_ongoing_requests}",
        )
        if self.auth_token_env is not None:
            _check(
                bool(re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", self.auth_token_env)),
                "auth_token_env",
                f"must be the name of an environment variable, got {self.auth_token_env!r}",
            )

    @property
    def default(self) -> str:
        """The model used when a request names none."""
        return self.default_model or next(iter(self.models))


def _nest(data: Mapping[str, Any]) -> dict[str, Any]:
    """Expand dotted keys (``models.x2``, ``storage.region``: how ``serve run`` passes args) into nested dicts."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        node = out
        parts = str(key).split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: {part} is a value, not a section")
            node = child
        last = parts[-1]
        if isinstance(value, Mapping) and isinstance(node.get(last), dict):
            node[last].update(value)
        else:
            node[last] = dict(value) if isinstance(value, Mapping) else value
    return out


def load_settings(data: Mapping[str, Any] | None, *, source: str = "serve settings") -> ServeSettings:
    """Validated :class:`ServeSettings` from plain (possibly dotted) data; errors name ``source`` and the key."""
    try:
        data = _nest(data or {})
        # from_dict handles the typed fields; the free-form models mapping (and default_model, which must name one
        # of them) are set afterwards, which runs the checks of __post_init__ again with everything in place.
        models = data.pop("models", None) or {}
        if not isinstance(models, Mapping):
            raise _InvalidSetting(f"models: expected a mapping of model name → weights source, got {models!r}")
        default_model = data.pop("default_model", None)
        if default_model is not None and not isinstance(default_model, str):
            raise _InvalidSetting(f"default_model: expected a model name, got {default_model!r}")
        settings = from_dict(ServeSettings, data, source=source)
        return dataclasses.replace(settings, models=dict(models), default_model=default_model)
    except _InvalidSetting as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except ConfigError as exc:
        if str(exc).startswith(f"{source}:"):
            raise
        raise ConfigError(f"{source}: {exc}") from None


def settings_from_args(args: Mapping[str, Any] | None, *, environ: Mapping[str, str] | None = None) -> ServeSettings:
    """Settings for the application builder: an optional YAML file (arg ``config`` or ``$EDSR_SERVE_CONFIG``), with
    the other args (nested, or dotted as ``serve run`` passes them) applied on top."""
    environ = os.environ if environ is None else environ
    args = dict(args or {})
    path = args.pop("config", None) or environ.get(CONFIG_ENV)
    data: dict[str, Any] = {}
    source = "application args"
    if path:
        try:
            loaded = yaml.safe_load(read_config_text(path, "serve settings"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{path}: the top level must be a mapping of settings")
        data = _nest(loaded)
        source = f"{path} + application args" if args else str(path)
    for key, value in _nest(args).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    settings = load_settings(data, source=source)
    if not settings.models:
        raise ConfigError(
            f"{source}: models: no model configured; give at least one, e.g. "
            "`serve run serve.app:app models.edsr_x2=/path/to/edsr_baseline_x2.pt`"
        )
    return settings


# --------------------------------------------------------------------------------------------------------------------
# Request checks (no Ray needed: plain functions of bytes and headers)


class RequestRejected(Exception):
    """A client mistake: answered with ``status`` and ``{"error": message}``, counted under ``reason``."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


def check_image(data: bytes, *, name: str, max_pixels: int) -> tuple[int, int, str]:
    """(width, height, format) of an upload, read from its header; rejects non-images, broken and oversized ones."""
    if not data:
        raise RequestRejected(
            400, "empty_body", "the request has no image: send it as the raw body or as a multipart field 'file'"
        )
    from edsr_ray.codecs import check_pixels, probe_image, sniff

    found = sniff(data)
    if found.kind != "image" or found.format not in ACCEPTED_FORMATS:
        accepted = ", ".join(f.upper() for f in ACCEPTED_FORMATS)
        raise RequestRejected(
            415, "not_an_image", f"{name}: not an image in a supported format ({accepted}): {found.description}"
        )
    fmt = found.format.upper()
    try:
        width, height, _ = probe_image(data, name=name)
        if width < 1 or height < 1:
            raise ImageError(f"{name}: the {fmt} header declares an empty {width}x{height} image")
        check_pixels(width, height, max_pixels, name)
    except ImageTooLargeError as exc:
        raise RequestRejected(413, "too_many_pixels", str(exc)) from None
    except ImageError as exc:
        raise RequestRejected(400, "corrupt_image", f"corrupt {fmt} image: {exc}") from None
    return width, height, fmt


def requested_size(outscale: str | None, width: str | None, height: str | None) -> OutputSize:
    """The ``outscale``/``width``/``height`` parameters as an :class:`~edsr_ray.outsize.OutputSize`, or a 400 naming
    the parameter (not a number, zero, negative, or outscale together with width/height)."""
    try:
        return OutputSize.parse(outscale, width, height)
    except FieldError as exc:
        raise RequestRejected(400, "bad_size", str(exc)) from None


def output_format(requested: str, input_format: str | None) -> str:
    """The output format for the ``format`` parameter (:func:`edsr_ray.codecs.output_format`), or a 422."""
    from edsr_ray.codecs import output_format as resolve

    try:
        return resolve(requested, input_format)
    except ImageError:
        raise RequestRejected(
            422, "bad_format", f"format {requested!r} is not supported; choose png, jpeg (jpg), webp or same"
        ) from None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes.

    Content-Length is checked first, then the stream is read with a running count, because a chunked upload has no
    length and a declared one can be wrong: memory never holds more than ``limit`` plus one chunk.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestRejected(400, "bad_request", f"Content-Length {declared!r} is not a number of bytes")
        if int(declared) > limit:
            raise RequestRejected(
                413,
                "body_too_large",
                f"request body of {int(declared):,} bytes exceeds the limit of {limit:,} bytes",
            )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestRejected(413, "body_too_large", f"request body exceeds the limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def image_from_body(headers: Headers, body: bytes) -> tuple[bytes, str]:
    """(image bytes, name for messages) from a raw body or a multipart/form-data body with a ``file`` field."""
    if not headers.get("content-type", "").lower().startswith("multipart/form-data"):
        return body, "request body"

    async def stream() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(headers, stream(), max_files=1, max_fields=16)
    parser.spool_max_size = len(body) + 1  # the body is in memory already: never spool the file part to disk
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise RequestRejected(400, "bad_request", f"malformed multipart body: {exc.message}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            fields = sorted(form.keys())
            raise RequestRejected(
                400, "bad_request", f"the multipart body has no file field named 'file' (fields: {fields})"
            )
        name = upload.filename or "uploaded file"
        return await upload.read(), name
    finally:
        await form.close()


def check_token(credentials: HTTPAuthorizationCredentials | None, expected: bytes) -> None:
    """401 unless the request carries ``Authorization: Bearer <expected>`` (compared in constant time)."""
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise RequestRejected(401, "unauthorized", "missing bearer token: send 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(credentials.credentials.encode(), expected):
        raise RequestRejected(401, "unauthorized", "invalid bearer token")


# --------------------------------------------------------------------------------------------------------------------
# Model replicas


@dataclass
class _Loaded:
    """One multiplexed model: the network and its two upscalers (plain and self-ensemble) sharing its weights."""

    plain: Any  # edsr_ray.inference.Upscaler
    ensemble: Any
    info: dict[str, Any]


@dataclass(frozen=True)
class _BatchItem:
    model: str
    scale: int
    self_ensemble: bool
    rgb: np.ndarray  # (H, W, 3) uint8


@serve.deployment(name=MODEL_DEPLOYMENT)
class EdsrModel:
    """Holds up to ``max_models_per_replica`` models and upscales decoded images, batching small ones."""

    def __init__(self, settings: dict[str, Any]):
        self._settings = load_settings(settings, source=f"{MODEL_DEPLOYMENT} settings")
        s = self._settings

        loading: dict[str, asyncio.Future] = {}

        async def load(name: str) -> _Loaded:  # a plain function: serve.multiplexed keeps its cache on it
            # The load runs as its own task, shielded: a request that times out while waiting for it must not abort
            # it (the next request for the model would start the download over, and a slow store never finish).
            task = loading.get(name)
            if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
                task = loading[name] = asyncio.ensure_future(self._load(name))
            try:
                loaded = await asyncio.shield(task)
            except asyncio.CancelledError:
                raise  # the task goes on; the next request for the model takes its result
            except BaseException:
                loading.pop(name, None)
                raise
            loading.pop(name, None)
            return loaded

        self._get_model = serve.multiplexed(max_num_models_per_replica=s.max_models_per_replica)(load)
        # @serve.batch is applied at class level; its size and wait come from the settings.
        self._upscale_batch.set_max_batch_size(s.max_batch_size)
        self._upscale_batch.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
        # One compute thread: forward passes run one after another (on a GPU, concurrent ones would only compete for
        # memory) while the event loop keeps collecting the next batch.
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edsr-compute")
        self._info: dict[str, dict[str, Any]] = {}
        self._batch_sizes: collections.Counter[int] = collections.Counter()
        self._single = 0
        from ray.serve.metrics import Histogram

        self._batch_histogram = Histogram(
            "edsr_serve_batch_size",
            description="Images per forward pass of the batched path.",
            boundaries=[1, 2, 4, 8, 16, 32, 64],
            tag_keys=("model",),
        )

    async def _load(self, name: str) -> _Loaded:
        from edsr_ray.inference import Upscaler
        from edsr_ray.weights import load_model

        source = self._settings.models.get(name)
        if source is None:  # the ingress checks names; this guards direct handle calls
            raise ConfigError(f"unknown model {name!r}; configured: {sorted(self._settings.models)}")
        model = await asyncio.to_thread(load_model, source, storage=self._settings.storage)
        s = self._settings
        plain = Upscaler(model, tile=s.tile, precision=s.precision)
        ensemble = Upscaler(model, tile=s.tile, precision=s.precision, self_ensemble=True)
        cfg = model.config
        info = {
            "arch": cfg.arch,
            "scales": [int(x) for x in model.scales],
            "n_resblocks": cfg.n_resblocks,
            "n_feats": cfg.n_feats,
            "res_scale": cfg.res_scale,
            "device": str(plain.device),
            "dtype": str(plain.dtype).removeprefix("torch."),
        }
        self._info[name] = info
        logger.info("model %r ready: %s", name, info)
        return _Loaded(plain, ensemble, info)

    async def _run(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the compute thread. If the request is cancelled (its client timed out), the upscale stops
        before its next forward pass, so the replica does not spend minutes on an answer nobody waits for."""
        from edsr_ray.inference import stop_when

        stop = threading.Event()

        def guarded() -> Any:
            with stop_when(stop.is_set):
                return fn(*args)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._compute, guarded)
        except asyncio.CancelledError:
            stop.set()
            raise

    async def describe(self, name: str) -> dict[str, Any]:
        """Architecture, scales, device and dtype of model ``name`` (loading it if needed)."""
        if name not in self._info:
            await self._get_model(name)
        return dict(self._info[name])

    async def stats(self) -> dict[str, Any]:
        """This replica's counts of batched forward passes by size, and of images upscaled one at a time."""
        return {
            "batches": {str(k): v for k, v in sorted(self._batch_sizes.items())},
            "max_batch_size_seen": max(self._batch_sizes, default=0),
            "single_images": self._single,
        }

    async def upscale(self, model: str, image: Any, scale: int, self_ensemble: bool = False) -> Any:
        """Upscale a :class:`~edsr_ray.codecs.DecodedImage` by ``scale`` with model ``model``; returns one too."""
        s = self._settings
        plain_rgb = image.bit_depth == 8 and image.alpha is None and not image.grey
        if s.max_batch_size > 1 and plain_rgb and image.height * image.width <= s.batch_max_pixels:
            out = await self._upscale_batch(_BatchItem(model, int(scale), bool(self_ensemble), image.rgb))
            if isinstance(out, BaseException):
                raise out
            return dataclasses.replace(image, rgb=out)
        loaded = await self._get_model(model)
        upscaler = loaded.ensemble if self_ensemble else loaded.plain
        self._single += 1
        # Large images are tiled inside the Upscaler (at `tile`, or automatically when they exceed its memory budget).
        return await self._run(upscaler.upscale_decoded, image, int(scale))

    async def upscale_frames(self, model: str, frames: np.ndarray, scale: int, self_ensemble: bool = False) -> Any:
        """Upscale a clip's (K, H, W, 3) frames (uint8, or uint16 for deeper videos) as one batch."""
        from edsr_ray.batch.video import upscale_frames

        loaded = await self._get_model(model)
        upscaler = loaded.ensemble if self_ensemble else loaded.plain
        self._single += 1
        return await self._run(upscale_frames, upscaler, frames, int(scale), len(frames))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _upscale_batch(self, items: list[_BatchItem]) -> list[np.ndarray | BaseException]:
        """Serve's batcher hands over queued small images (one multiplexed model id per call); images of one
        (model, scale, ensemble, size) go through one forward pass, others in their own. Returns one result per item,
        an exception object where that item's group failed, so one bad group cannot fail the others."""
        groups: dict[tuple, list[int]] = collections.defaultdict(list)
        for i, item in enumerate(items):
            groups[(item.model, item.scale, item.self_ensemble, item.rgb.shape)].append(i)
        results: list[np.ndarray | BaseException | None] = [None] * len(items)
        for (name, scale, ensemble, _), members in groups.items():
            try:
                loaded = await self._get_model(name)
                upscaler = loaded.ensemble if ensemble else loaded.plain
                stack = np.stack([items[i].rgb for i in members])  # (B, H, W, 3) uint8
                out = await self._run(upscaler.upscale_batch, stack, scale)  # (B, H*s, W*s, 3) uint8
            except Exception as exc:  # handed back to exactly the requests of this group
                logger.exception("batch of %d image(s) for model %r failed", len(members), name)
                for i in members:
                    results[i] = exc
                continue
            self._batch_sizes[len(members)] += 1
            self._batch_histogram.observe(len(members), tags={"model": name})
            for k, i in enumerate(members):
                results[i] = out[k]
        return results  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------------------------
# HTTP ingress


_UPLOAD_BODY = {
    "required": True,
    "content": {
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            }
        },
    },
}
_ERROR_SCHEMA = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"description": text, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
    for code, text in (
        (400, "Empty, malformed or corrupt upload; bad outscale, width or height"),
        (401, "Missing or invalid bearer token (when auth is on)"),
        (408, "The request body arrived too slowly"),
        (413, "Body over the byte limit, image or output over the pixel limit, or clip over a clip limit"),
        (415, "Not an image or video in a supported format"),
        (422, "Unsupported scale, model, format or parameter"),
        (503, "The model could not be loaded"),
        (504, "Upscaling took longer than the request timeout"),
    )
}


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "header", "body"))
        got = f" (got {err['input']!r})" if "input" in err and err["input"] is not None else ""
        parts.append(f"{where or 'request'}: {err.get('msg', 'invalid value')}{got}")
    return "; ".join(parts) or "invalid request parameters"


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress()
class EdsrIngress:
    """HTTP front: limits, auth, parameter checks, decode → :class:`EdsrModel` → resize → encode. No model runs
    here."""

    def __init__(self, model: DeploymentHandle, settings: dict[str, Any]):
        from ray.serve.metrics import Counter

        self._settings = load_settings(settings, source=f"{INGRESS_DEPLOYMENT} settings")
        self._model = model
        self._token: bytes | None = None
        env = self._settings.auth_token_env
        if env is not None:
            token = os.environ.get(env, "")
            if not token:
                # Refuse to start rather than serve without the protection the settings ask for.
                raise ConfigError(
                    f"auth_token_env: environment variable {env} is not set (or empty) on the ingress replica; "
                    "set it there (e.g. from a secret) or remove auth_token_env"
                )
            self._token = token.encode()
        self._info: dict[str, dict[str, Any]] = {}
        self._images = Counter("edsr_serve_images", "Images upscaled.", tag_keys=("model", "scale"))
        self._megapixels = Counter(
            "edsr_serve_input_megapixels", "Input megapixels upscaled.", tag_keys=("model", "scale")
        )
        self._rejections = Counter("edsr_serve_rejections", "Requests refused, by reason.", tag_keys=("reason",))

    # ---- the FastAPI app (built on the replica: routes close over this instance) ----------------------------------

    def __serve_build_asgi_app__(self) -> FastAPI:
        s = self._settings
        api = FastAPI(
            title="EDSR super-resolution",
            version=__version__,
            description='Upscale images by x2, x3 or x4 with EDSR / MDSR models. Errors are JSON {"error": ...}.',
        )
        api.add_exception_handler(RequestRejected, self._on_rejected)
        api.add_exception_handler(RequestValidationError, self._on_invalid)
        api.add_exception_handler(StarletteHTTPException, self._on_http_error)
        api.add_exception_handler(Exception, self._on_server_error)
        bearer = HTTPBearer(auto_error=False, description="Token from the variable named by auth_token_env")

        def authorize(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
            if self._token is not None:
                check_token(credentials, self._token)

        guarded = [Depends(authorize)] if self._token is not None else []

        @api.get("/healthz", summary="Liveness of the HTTP front")
        async def healthz() -> dict[str, str]:
            return {"status": "ok"}

        @api.get("/v1/models", summary="Configured models, their scales, precision and limits", dependencies=guarded)
        async def models() -> dict[str, Any]:
            entries = []
            for name in s.models:
                try:
                    entries.append({"name": name, **await self._model_info(name)})
                except RequestRejected as exc:
                    entries.append({"name": name, "error": exc.message})
            stats = await self._call(self._model.stats.remote(), "reading replica statistics")
            return {
                "default_model": s.default,
                "precision": s.precision,
                "models": entries,
                "formats": [*OUTPUT_FORMATS, SAME_FORMAT],
                "limits": {
                    "max_body_bytes": s.max_body_bytes,
                    "max_pixels": s.max_pixels,
                    "max_output_pixels": output_pixel_limit(s.max_pixels),
                    "max_clip_frames": s.max_clip_frames,
                    "max_clip_seconds": s.max_clip_seconds,
                    "max_clip_output_pixels": s.max_clip_output_pixels,
                    "request_timeout_s": s.request_timeout_s,
                },
                "batching": {
                    "max_batch_size": s.max_batch_size,
                    "batch_wait_timeout_s": s.batch_wait_timeout_s,
                    "batch_max_pixels": s.batch_max_pixels,
                },
                "stats": stats,
            }

        @api.post(
            "/v1/upscale",
            summary="Upscale an image or a short video clip (raw body or multipart field 'file')",
            dependencies=guarded,
            openapi_extra={"requestBody": _UPLOAD_BODY},
            responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}}, **_ERROR_RESPONSES},
            response_class=Response,
        )
        async def upscale(
            request: Request,
            scale: int | None = Query(None, description="2, 3 or 4; may be left out when the model has one scale"),
            model: str | None = Query(None, description="Configured model name; default: one that has the scale"),
            fmt: str = Query("png", alias="format", description="png, jpeg (jpg), webp, or same (as the input)"),
            self_ensemble: bool = Query(False, description="Average the 8 flips/transposes (8x the compute)"),
            quality: int = Query(95, ge=1, le=100, description="JPEG/WebP quality"),
            outscale: str | None = Query(
                None,
                description="Final size = this factor x the input (e.g. 1.5): the smallest model scale that covers "
                "it, then resized (bicubic, antialiased when shrinking); not with width/height",
            ),
            width: str | None = Query(None, description="Final width in pixels; alone, the height keeps the aspect"),
            height: str | None = Query(None, description="Final height in pixels; with width, exactly that box"),
        ) -> Response:
            size = requested_size(outscale, width, height)
            return await self._upscale(request, scale, model, fmt, self_ensemble, quality, size)

        return api

    # ---- error answers ---------------------------------------------------------------------------------------------

    def _reject(self, status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        self._rejections.inc(tags={"reason": reason})
        logger.info("rejected (%d %s): %s", status, reason, message)
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def _on_rejected(self, request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestRejected)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return self._reject(exc.status, exc.reason, exc.message, headers)

    async def _on_invalid(self, request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return self._reject(422, "bad_parameter", _validation_message(exc))

    async def _on_http_error(self, request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    async def _on_server_error(self, request: Request, exc: Exception) -> JSONResponse:
        # Not a client mistake (those are all RequestRejected): a bug or a failed replica. Logged with its traceback
        # by Starlette; the client gets JSON like every other answer, without internals.
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server log has the details"}, 500)

    # ---- calls to the model deployment ----------------------------------------------------------------------------

    async def _call(self, response: Any, what: str) -> Any:
        """Await a model-deployment response within request_timeout_s (504), mapping load failures to 503."""
        timeout = self._settings.request_timeout_s
        try:
            return await asyncio.wait_for(_awaitable(response), timeout)
        except asyncio.TimeoutError:
            response.cancel()
            raise RequestRejected(
                504, "timeout", f"{what} took longer than the {timeout:g} s request timeout"
            ) from None
        except EdsrRayError as exc:
            # A model that cannot be loaded (missing file, unreachable store) is the server's problem, not the
            # client's: 503. The loader's message names paths and buckets, so it goes to the log, not to the client.
            logger.error("%s failed: %s", what, _cause_message(exc))
            raise RequestRejected(
                503, "model_unavailable", f"{what} failed ({type(exc).__name__}); the server log has the details"
            ) from None

    async def _model_info(self, name: str) -> dict[str, Any]:
        if name not in self._info:
            handle = self._model.options(multiplexed_model_id=name)
            self._info[name] = await self._call(handle.describe.remote(name), f"loading model {name!r}")
        return self._info[name]

    async def _choose(self, model: str | None, scale: int | None) -> tuple[str, int]:
        """(model name, scale) for the request, or 422 naming what is not available."""
        s = self._settings
        if scale is not None and scale not in SCALES:
            raise RequestRejected(422, "bad_scale", f"scale {scale} is not supported; choose one of {list(SCALES)}")
        if model is not None:
            if model not in s.models:
                raise RequestRejected(422, "bad_model", f"unknown model {model!r}; available: {sorted(s.models)}")
            scales = (await self._model_info(model))["scales"]
            if scale is None:
                if len(scales) == 1:
                    return model, scales[0]
                raise RequestRejected(422, "bad_scale", f"model {model!r} upscales by {scales}: choose one with scale=")
            if scale not in scales:
                raise RequestRejected(
                    422, "bad_scale", f"model {model!r} does not upscale by x{scale}; its scales are {scales}"
                )
            return model, scale
        if scale is None:
            return await self._choose(s.default, None)
        offered: dict[str, Any] = {}
        unavailable: RequestRejected | None = None
        for name in [s.default, *(n for n in s.models if n != s.default)]:
            try:
                offered[name] = (await self._model_info(name))["scales"]
            except RequestRejected as exc:  # a model that cannot load must not hide one that can
                if exc.status < 500:
                    raise
                unavailable, offered[name] = exc, "unavailable"
                continue
            if scale in offered[name]:
                return name, scale
        if unavailable is not None:
            raise unavailable
        raise RequestRejected(422, "bad_scale", f"no configured model upscales by x{scale}; models offer {offered}")

    async def _offered_scales(self, model: str | None) -> list[int]:
        """The scales ``model`` offers, or (None) every model that can load; empty for an unknown model."""
        s = self._settings
        names = list(s.models) if model is None else [model] if model in s.models else []
        scales: set[int] = set()
        for name in names:
            try:
                scales.update((await self._model_info(name))["scales"])
            except RequestRejected as exc:  # as in _choose: a model that cannot load must not hide one that can
                if exc.status < 500 or model is not None:
                    raise
        return sorted(scales)

    # ---- the upscale request ---------------------------------------------------------------------------------------

    async def _upscale(
        self,
        request: Request,
        scale: int | None,
        model: str | None,
        fmt: str,
        self_ensemble: bool,
        quality: int,
        size: OutputSize,
    ) -> Response:
        from edsr_ray.codecs import content_type, decode_image, encode_image

        s = self._settings
        output_format(fmt, None)  # a bad format is refused before the body is read
        try:
            body = await asyncio.wait_for(read_body(request, s.max_body_bytes), s.body_timeout_s)
        except asyncio.TimeoutError:
            raise RequestRejected(
                408, "body_timeout", f"the request body did not arrive within {s.body_timeout_s:g} s"
            ) from None
        data, name = await image_from_body(request.headers, body)
        from edsr_ray.video import sniff_container

        if sniff_container(data[:512]) is not None:
            if size.asked:
                raise RequestRejected(
                    422,
                    "bad_parameter",
                    f"{name}: outscale, width and height apply to images only; send the clip without them (it is "
                    "answered at the model's factor)",
                )
            return await self._upscale_clip(data, name, scale, model, self_ensemble)
        width, height, in_format = check_image(data, name=name, max_pixels=s.max_pixels)
        if size.asked and scale is None:  # the smallest scale that covers the size asked for (edsr_ray.outsize)
            offered = await self._offered_scales(model)
            scale = size.choose_scale(offered, height, width) if offered else None
        name_, scale_ = await self._choose(model, scale)
        out_format = output_format(fmt, in_format)
        final = size.final_shape(height, width, scale_)
        try:
            check_output(height, width, final, max_pixels=s.max_pixels, fmt=out_format)  # before the work
        except ImageTooLargeError as exc:
            raise RequestRejected(413, "too_many_pixels", f"{name}: {exc}") from None
        except ImageError as exc:
            raise RequestRejected(422, "output_too_large", f"{name}: {exc}") from None
        try:
            decoded = await asyncio.to_thread(decode_image, data, name=name, max_pixels=s.max_pixels)
        except ImageTooLargeError as exc:
            raise RequestRejected(413, "too_many_pixels", str(exc)) from None
        except ImageError as exc:
            raise RequestRejected(400, "corrupt_image", str(exc)) from None
        handle = self._model.options(multiplexed_model_id=name_)
        result = await self._call(
            handle.upscale.remote(name_, decoded, scale_, self_ensemble), f"upscaling with model {name_!r}"
        )
        if size.asked:  # resized here, on the ingress's CPU, never on the model replica
            result = await asyncio.to_thread(resize_decoded, result, final)
        payload = await asyncio.to_thread(encode_image, result, out_format, quality=quality)
        tags = {"model": name_, "scale": str(scale_)}
        self._images.inc(tags=tags)
        self._megapixels.inc(width * height / 1e6, tags=tags)
        return Response(
            payload,
            media_type=content_type(out_format),
            headers={"X-Upscale-Model": name_, "X-Upscale-Scale": str(scale_)},
        )

    async def _upscale_clip(
        self, data: bytes, name: str, scale: int | None, model: str | None, self_ensemble: bool
    ) -> Response:
        """A video clip: checked against the clip limits, its frames upscaled by the model deployment at most
        ``max_batch_size`` at a time, encoded with the default video options, answered in its own container."""
        import io

        from edsr_ray.video import VideoError, VideoLimits, VideoOptions, VideoTooLargeError, upscale_clip

        s = self._settings
        limits = VideoLimits(s.max_pixels, s.max_clip_frames, s.max_clip_seconds)
        options = VideoOptions(part_bytes=CLIP_PART_BYTES, limits=limits)
        info = await asyncio.to_thread(clip_info, data, name, limits)
        name_, scale_ = await self._choose(model, scale)
        work = info.frames * info.width * info.height * scale_ * scale_
        if work > s.max_clip_output_pixels:
            raise RequestRejected(
                413,
                "clip_too_large",
                f"{name}: {info.frames} frames of {info.width * scale_}x{info.height * scale_} output pixels are "
                f"{work:,} pixels, over the limit of {s.max_clip_output_pixels:,}; {BATCH_JOB_HINT}",
            )
        handle = self._model.options(multiplexed_model_id=name_)
        loop = asyncio.get_running_loop()
        what = f"upscaling a clip with model {name_!r}"

        async def one(chunk: np.ndarray) -> np.ndarray:  # on the event loop: the handle is called from there
            return await self._call(handle.upscale_frames.remote(name_, chunk, scale_, self_ensemble), what)

        def upscale(frames: np.ndarray) -> np.ndarray:  # on a worker thread, which waits for the loop's calls
            step = s.max_batch_size
            calls = [
                asyncio.run_coroutine_threadsafe(one(frames[i : i + step]), loop) for i in range(0, len(frames), step)
            ]
            return np.concatenate([call.result() for call in calls])  # (K, H*s, W*s, 3)

        out = io.BytesIO()
        try:
            done = await asyncio.to_thread(upscale_clip, io.BytesIO(data), out, upscale, scale_, options, name=name)
        except VideoTooLargeError as exc:  # headers can under-declare: the index counts again
            raise RequestRejected(413, "clip_too_large", f"{exc}; {BATCH_JOB_HINT}") from None
        except VideoError as exc:
            raise RequestRejected(400, "corrupt_video", str(exc)) from None
        tags = {"model": name_, "scale": str(scale_)}
        self._images.inc(tags=tags)
        self._megapixels.inc(done.result.frames * info.width * info.height / 1e6, tags=tags)
        return Response(
            out.getvalue(),
            media_type=done.output.format.content_type,
            headers={
                "X-Upscale-Model": name_,
                "X-Upscale-Scale": str(scale_),
                "X-Upscale-Frames": str(done.result.frames),
            },
        )


def clip_info(data: bytes, name: str, limits: Any) -> Any:
    """The :class:`~edsr_ray.video.VideoInfo` of an uploaded clip with its frames counted (headers may declare none
    or too few), or the 4xx that refuses it: 413 over a limit, 415 without a video stream, 400 when broken."""
    import io

    from edsr_ray.video import VideoError, VideoTooLargeError, build_index, probe

    try:
        info = probe(io.BytesIO(data), limits, name=name)
        index = build_index(io.BytesIO(data), info, limits, name=name)
    except VideoTooLargeError as exc:
        raise RequestRejected(413, "clip_too_large", f"{exc}; {BATCH_JOB_HINT}") from None
    except VideoError as exc:
        status, reason = (415, "no_video_stream") if "no video stream" in str(exc) else (400, "corrupt_video")
        raise RequestRejected(status, reason, str(exc)) from None
    return dataclasses.replace(info, frames=len(index.pts))


async def _awaitable(response: Any) -> Any:
    return await response


def _cause_message(exc: BaseException) -> str:
    """The user-facing message of an error raised on a replica (Ray wraps it with a remote traceback)."""
    cause = getattr(exc, "cause", None)
    return str(cause) if cause is not None else str(exc).strip().splitlines()[-1]


# --------------------------------------------------------------------------------------------------------------------
# Application


def build_app(settings: ServeSettings) -> serve.Application:
    """The Serve application: ``EdsrIngress`` → ``EdsrModel``, sized and configured by ``settings``."""
    if not settings.models:
        raise ConfigError("models: no model configured; give at least one name → weights source")
    plain = to_dict(settings)
    model = EdsrModel.options(
        max_ongoing_requests=settings.max_ongoing_requests,
        ray_actor_options={"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus},
    ).bind(plain)
    return EdsrIngress.options(
        max_ongoing_requests=settings.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": settings.ingress_num_cpus},
    ).bind(model, plain)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Serve application builder for ``serve run`` / ``serve deploy``: args → :class:`ServeSettings` → application."""
    return build_app(settings_from_args(args))
