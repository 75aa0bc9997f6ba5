"""MLflow tracking: an absolute tracking URI, experiments with fixed artifact roots, runs, pictures and the registry.

The embedded default is a sqlite file in the project home (:mod:`edsr_ray.home`: ``$EDSR_RAY_HOME``, default
``~/.edsr-ray``) with artifacts beside it, so a run logged from a Ray worker (whose cwd is Ray's session folder) lands
in the same place as one logged from the driver. ``MLFLOW_TRACKING_URI`` or ``tracking.tracking_uri`` point
everything at a server instead.

Models are logged as MLflow models whose ``python_function`` flavour loads the project's own checkpoint (weights + full
model config) with the project's code (:mod:`edsr_ray.mlflow_model`), never in MLflow's ``pt2`` flavour, which fixes
the input height and width to the example's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edsr_ray import home
from edsr_ray.config import TrackingConfig
from edsr_ray.errors import EdsrRayError

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"  # name of a logged model
RUN_KEY_TAG = "edsr_ray.run_key"


def default_tracking_uri() -> str:
    """The embedded store: a sqlite file in the project home (:func:`edsr_ray.home.mlflow_db`)."""
    return f"sqlite:///{home.mlflow_db()}"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """An absolute tracking URI: ``uri``, else ``MLFLOW_TRACKING_URI``, else the embedded sqlite default.

    Relative sqlite and file paths are made absolute here, on the driver, because Ray workers run in another cwd.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///') :]).expanduser().resolve()}"
    elif "://" not in uri:
        uri = Path(uri).expanduser().resolve().as_uri()
    return uri


def _artifact_root(uri: str) -> str | None:
    """Artifact location for new experiments on a local store; a server chooses its own."""
    if uri.startswith("sqlite:"):
        return (Path(uri[len("sqlite:///") :]).parent / "artifacts").as_uri()
    return None


def mlflow_module():
    """Import MLflow with its usage telemetry off (nothing the project starts may call outside the machine), its
    messages going through this process's logging rather than straight to the terminal."""
    from edsr_ray.infra.ray import quiet_environment, to_process_logging

    quiet_environment()
    # MLflow's own download/upload progress bars would draw over the project's progress and summary.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    to_process_logging("mlflow")
    return mlflow


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Fail within seconds, with the server named, when an HTTP tracking server cannot be reached."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
                pass
        except OSError as exc:
            raise EdsrRayError(
                f"MLflow tracking server {parsed.scheme}://{parsed.hostname}:{port} is unreachable ({exc}); "
                "start it or set tracking.tracking_uri / MLFLOW_TRACKING_URI"
            ) from None
    elif uri.startswith("sqlite:"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)


def ensure_experiment(name: str, uri: str) -> str:
    """Experiment id for ``name``, created with an absolute artifact root when it does not exist."""
    mlflow = mlflow_module()
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_root(uri))
    except mlflow.exceptions.MlflowException:
        # Another process created it between the lookup and the create.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_or_create_run(cfg: TrackingConfig, run_key: str, run_name: str, uri: str, *, resume: bool) -> str:
    """The MLflow run id for a training run.

    ``resume``: the training run already has checkpoints and continues, so its latest MLflow run (same key) goes on,
    whatever its status; otherwise a new MLflow run is created.
    """
    mlflow = mlflow_module()
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_id = ensure_experiment(cfg.experiment, uri)
    if resume:
        runs = client.search_runs(
            [exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", order_by=["attributes.start_time DESC"]
        )
        if runs:
            client.update_run(runs[0].info.run_id, status="RUNNING")
            return runs[0].info.run_id
    run = client.create_run(exp_id, run_name=run_name, tags={RUN_KEY_TAG: run_key})
    return run.info.run_id


class RunLogger:
    """Logs into one existing MLflow run through the client API (no global active-run state, safe in workers)."""

    def __init__(self, run_id: str, uri: str):
        self.run_id = run_id
        self.uri = uri
        self._client = mlflow_module().MlflowClient(tracking_uri=uri)

    def log_params(self, params: Mapping[str, Any]) -> None:
        existing = self._client.get_run(self.run_id).data.params
        # MLflow refuses to change a logged param; on resume the same values are simply skipped.
        fresh = {k: str(v) for k, v in params.items() if k not in existing}
        mlflow = mlflow_module()
        items = [mlflow.entities.Param(k, v[:6000]) for k, v in fresh.items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        mlflow = mlflow_module()
        import time

        now = int(time.time() * 1000)
        items = [mlflow.entities.Metric(k, float(v), now, step) for k, v in metrics.items() if np.isfinite(v)]
        if items:
            self._client.log_batch(self.run_id, metrics=items)

    def last_metric(self, key: str) -> Any:
        """The value last logged for ``key`` (an MLflow ``Metric``: ``value``, ``step``, ``timestamp`` in ms), or None
        when there is none. The last in time, then by step: after a restart that redid updates, that is the value
        the restarted workers logged, not the one of a higher step the lost ones logged before."""
        history = self._client.get_metric_history(self.run_id, key)
        return max(history, key=lambda m: (m.timestamp, m.step)) if history else None

    def set_tag(self, key: str, value: str) -> None:
        self._client.set_tag(self.run_id, key, value)

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        """Log an (H, W[, C]) uint8/uint16 image as ``artifact_file`` (its extension picks PNG, JPEG or WebP).

        Encoded by :func:`edsr_ray.codecs.encode_image`, the one encoder of every image the project writes, so a
        picture gets the same size checks as any output, rather than through MLflow's own Pillow call.
        """
        from edsr_ray.codecs import encode_image, format_from_name

        data = encode_image(image, format_from_name(artifact_file))
        folder, _, name = artifact_file.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            self._client.log_artifact(self.run_id, str(path), folder or None)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self.run_id, text, artifact_file)

    def register(self, name: str, model_uri: str, aliases: tuple[str, ...] = ()) -> str:
        """Register the logged model ``model_uri`` as a new version of ``name``; returns the version."""
        mlflow = mlflow_module()
        client = self._client
        try:
            client.create_registered_model(name)
        except mlflow.exceptions.MlflowException as exc:
            if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
                raise
        model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
        # The sqlite registry looks the logged model up through MLflow's module-level tracking URI, not the client's.
        with fluent_tracking_uri(self.uri):
            mv = client.create_model_version(name, source=model_uri, run_id=self.run_id, model_id=model_id)
        for alias in aliases:
            client.set_registered_model_alias(name, alias, mv.version)
        return str(mv.version)

    def end(self, status: str = "FINISHED") -> None:
        self._client.set_terminated(self.run_id, status=status)


@contextlib.contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's module-level API (``mlflow.start_run``, ``mlflow.pyfunc.log_model``, ...) bound to ``uri`` in the block.

    ``mlflow.set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI`` into the process's environment, for subprocesses
    to inherit; left there, it would silently redirect everything this process starts afterwards (a job, a cluster
    node, a Serve replica) to this store. Both are put back as they were when the block ends.
    """
    mlflow = mlflow_module()
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None unsets both the variable and MLflow's own setting


def download_model_uri(uri: str, tracking_uri: str | None = None, dst_path: str | None = None) -> str:
    """Local path of the artifacts behind ``models:/name/version-or-alias`` or ``runs:/id/path``.

    Downloaded into ``dst_path`` (the caller's to remove), or a new temporary folder.
    """
    mlflow = mlflow_module()
    resolved = resolve_tracking_uri(tracking_uri)
    try:
        dst = dst_path or tempfile.mkdtemp(prefix="edsr-model-")
        # A logged model's URI (models:/m-...) is looked up through the module-level tracking URI, whatever is passed.
        with fluent_tracking_uri(resolved):
            return mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=dst, tracking_uri=resolved, registry_uri=resolved
            )
    except mlflow.exceptions.MlflowException as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EdsrRayError(f"cannot resolve model {uri!r} in MLflow at {resolved}: {first}") from None


def comparison_picture(bicubic: np.ndarray, sr: np.ndarray, hr: np.ndarray, crop: int = 192) -> np.ndarray:
    """A side-by-side strip ``bicubic | model | HR`` of the same centre crop, with 4-pixel white gutters."""
    h, w = hr.shape[:2]
    c = min(crop, h, w)
    top, left = (h - c) // 2, (w - c) // 2
    tiles = [img[top : top + c, left : left + c] for img in (bicubic, sr, hr)]
    gutter = np.full((c, 4, 3), 255, dtype=np.uint8)
    return np.concatenate([tiles[0], gutter, tiles[1], gutter, tiles[2]], axis=1)
