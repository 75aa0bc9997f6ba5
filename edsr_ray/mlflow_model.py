"""Models as MLflow models: the ``python_function`` flavour whose loader is this module, and where the weights are.

Every trained model is logged (:func:`log_model`) and registered as an MLflow model, so the registry's own tools work
on it: ``mlflow.pyfunc.load_model("models:/NAME@best").predict(images, params={"scale": 4})`` upscales, ``mlflow
models serve`` serves it, and the MLflow UI shows its flavour, signature and input example. A logged model folder::

    MLmodel                      python_function flavour: loader_module edsr_ray.mlflow_model, data data/model.pt;
                                 signature; metadata (model config, training metrics, source run, versions)
    data/model.pt                the project checkpoint (weights + model config), read with weights_only=True
    code/edsr_ray/...            this package, so the model loads where edsr-ray is not installed
    requirements.txt, python_env.yaml, conda.yaml    third-party packages pinned to the versions that logged it
    input_example.json, serving_input_example.json   an 8x8 image and its scale

``predict`` takes uint8 ``(N, H, W, 3)`` RGB images of one size (any H and W) and returns uint8 ``(N, H*s, W*s, 3)``,
through the project's one inference path (:class:`~edsr_ray.inference.Upscaler`), so the pixels equal those of the
batch job and Serve. Params: ``scale`` (required for a multi-scale MDSR model), ``self_ensemble``, ``tile`` (0:
automatic). Float inputs are refused, never rounded: MLflow's schema check refuses them before ``predict`` is called.
Over ``mlflow models serve`` the request is JSON, which has no dtype: MLflow converts its numbers to the signature's
uint8 before the model sees them (values outside 0-255 are refused; fractions such as 0.5 are truncated by MLflow).
Mistakes (a scale the model lacks, a tile too small, an image over the pixel limit) raise ``MlflowException`` with
the project's message, which the scoring server returns as a 400.

Serve a registered version with no network and nothing installed (``--env-manager local`` uses this environment)::

    MLFLOW_TRACKING_URI=sqlite:////abs/path/mlflow.db MLFLOW_DISABLE_TELEMETRY=true \\
        mlflow models serve -m models:/NAME@best --env-manager local -h 127.0.0.1 -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
        -d '{"inputs": [[[[0, 0, 0], ...]]], "params": {"scale": 4}}'      # -> {"predictions": [...]}

JSON makes this slow for large images (a 128x128 image at x3 is a 2.4 MB response); the Ray Serve endpoint, which
takes and returns encoded images, is the service for production traffic.

The import path ``edsr_ray.mlflow_model`` is recorded in every logged model as its loader: it must stay importable
under this name (or as a module re-exporting :func:`_load_pyfunc`), or older versions stop loading through
``mlflow.pyfunc``. The project's own loader does not depend on it: :func:`edsr_ray.weights.weights_path` reads
the weights' location from ``MLmodel`` and the checkpoint's format tag decides the rest, so registered versions of
either layout (an MLflow model, or an older plain folder with ``model.pt``) load with
:func:`edsr_ray.weights.load_model`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edsr_ray.errors import ConfigError, EdsrRayError, ImageError, ImageTooLargeError
from edsr_ray.weights import LOADER_MODULE

if TYPE_CHECKING:
    from edsr_ray.tracking import RunLogger

# Third-party distributions the pyfunc path imports (tests/test_mlflow_model.py checks the list is complete).
REQUIREMENTS = ("mlflow", "numpy", "pillow", "pyyaml", "torch")
_EXAMPLE_SIDE = 8


# --------------------------------------------------------------------------------------------------------------------
# The pyfunc model


class EdsrPyfuncModel:
    """What ``mlflow.pyfunc.load_model`` wraps: a loaded EDSR/MDSR model and its upscalers, one per setting."""

    def __init__(self, model: Any):
        self.model = model
        self._upscalers: dict[tuple[int, bool], Any] = {}

    def _upscaler(self, tile: int, self_ensemble: bool) -> Any:
        from edsr_ray.inference import Upscaler

        key = (tile, self_ensemble)
        if key not in self._upscalers:
            self._upscalers[key] = Upscaler(self.model, tile=tile or None, self_ensemble=self_ensemble)
        return self._upscalers[key]

    def predict(self, model_input: Any, params: Mapping[str, Any] | None = None) -> np.ndarray:
        """uint8 (N, H, W, 3) RGB → uint8 (N, H*s, W*s, 3); ``params``: scale, self_ensemble, tile."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            return self._predict(model_input, dict(params or {}))
        except EdsrRayError as exc:
            # The scoring server answers an MlflowException with a 400 and its message; anything else is a generic
            # "unexpected error" with the message buried in a stack trace.
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None

    def _predict(self, images: Any, params: dict[str, Any]) -> np.ndarray:
        from edsr_ray.codecs import MAX_PIXELS_DEFAULT
        from edsr_ray.inference import resolve_scale

        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            found = f"{images.dtype} array of shape {images.shape}" if isinstance(images, np.ndarray) else type(images)
            raise ImageError(
                f"expected uint8 (N, H, W, 3) RGB images (0-255), got a {found}; float images are refused, not rounded"
            )
        n, h, w, _ = images.shape
        if h == 0 or w == 0:
            raise ImageError(f"cannot upscale empty images of shape {images.shape}")
        if h * w > MAX_PIXELS_DEFAULT:
            raise ImageTooLargeError(
                f"{h}x{w} = {h * w:,} pixels per image exceeds the limit of {MAX_PIXELS_DEFAULT:,}"
            )
        try:
            scale = params.get("scale")
            scale = None if scale is None else int(scale)
            tile = int(params.get("tile") or 0)
            self_ensemble = bool(params.get("self_ensemble", False))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid params {params}: {exc}") from None
        scale = resolve_scale(self.model, scale)
        if n == 0:
            return np.empty((0, h * scale, w * scale, 3), dtype=np.uint8)
        return self._upscaler(tile, self_ensemble).upscale_batch(images, scale)


def _load_pyfunc(data_path: str) -> EdsrPyfuncModel:
    """MLflow's entry point: ``data_path`` is the model's ``data/model.pt``."""
    from edsr_ray.weights import load_model

    return EdsrPyfuncModel(load_model(data_path))


# --------------------------------------------------------------------------------------------------------------------
# What is logged beside the weights


def signature(scales: tuple[int, ...]) -> Any:
    """uint8 images of any count and size in and out; ``scale`` defaults to the only scale (none for MDSR)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    # Unnamed: predict then receives the array itself (a named spec would hand it a dict).
    images = Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))])
    params = ParamSchema(
        [
            ParamSpec("scale", "long", scales[0] if len(scales) == 1 else None),
            ParamSpec("self_ensemble", "boolean", False),
            ParamSpec("tile", "long", 0),
        ]
    )
    return ModelSignature(inputs=images, outputs=images, params=params)


def input_example(scale: int) -> tuple[np.ndarray, dict[str, int]]:
    """A tiny image (a colour gradient, 8x8: about 1 KB of JSON) and its params."""
    ramp = np.linspace(0, 255, _EXAMPLE_SIDE).round().astype(np.uint8)
    rgb = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], ramp[::-1, None]), axis=-1)  # (8, 8, 3)
    return rgb[None], {"scale": int(scale)}


def requirements() -> list[str]:
    """:data:`REQUIREMENTS` pinned to the installed versions (a local build tag such as ``+cpu`` dropped)."""
    return [f"{name}=={version(name).split('+')[0]}" for name in REQUIREMENTS]


def model_metadata(cfg: Any, metrics: Mapping[str, Any] | None, run_id: str) -> dict[str, Any]:
    import edsr_ray
    from edsr_ray.config import to_dict
    from edsr_ray.weights import CHECKPOINT_FORMAT

    finite = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and np.isfinite(value):
            finite[str(key)] = float(value)
    return {
        "model_config": to_dict(cfg),
        "metrics": finite,
        "source_run_id": run_id,
        "edsr_ray_version": edsr_ray.__version__,
        "checkpoint_format": CHECKPOINT_FORMAT,
    }


def log_model(
    logger: RunLogger,
    source: Any,
    name: str = "model",
    metrics: Mapping[str, Any] | None = None,
) -> str:
    """Log the model at ``source`` (anything :func:`~edsr_ray.weights.load_model` takes) as an MLflow model of the
    logger's run, named ``name``; returns its ``models:/<model id>`` URI, ready to register
    (:meth:`~edsr_ray.tracking.RunLogger.register`).

    The weights are rewritten as a project checkpoint, so the logged file always carries its model config. The run's
    status is left as it was.
    """
    import edsr_ray
    from edsr_ray.tracking import fluent_tracking_uri, mlflow_module
    from edsr_ray.weights import load_model, save_model

    run_id, tracking_uri = logger.run_id, logger.uri
    mlflow = mlflow_module()
    model = load_model(source)
    cfg = model.config
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    status = client.get_run(run_id).info.status
    with tempfile.TemporaryDirectory(prefix="edsr-mlflow-") as tmp, fluent_tracking_uri(tracking_uri):
        weights = save_model(model, Path(tmp) / "model.pt")
        try:
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(
                    name=name,
                    loader_module=LOADER_MODULE,
                    data_path=weights,
                    code_paths=[str(Path(edsr_ray.__file__).parent)],
                    signature=signature(cfg.scales),
                    input_example=input_example(cfg.scales[0]),
                    metadata=model_metadata(cfg, metrics, run_id),
                    pip_requirements=requirements(),
                )
        finally:
            client.update_run(run_id, status=status)  # leaving start_run's block ends the run; logging must not
    return info.model_uri
