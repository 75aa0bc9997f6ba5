"""MLflow tracking against a real sqlite store: URIs, runs that resume, pictures, registered models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edsr_ray import tracking
from edsr_ray.codecs import decode_image
from edsr_ray.config import TrackingConfig
from edsr_ray.errors import EdsrRayError
from edsr_ray.mlflow_model import log_model


@pytest.fixture
def store(mlflow_store):
    return mlflow_store


def test_default_uri_is_absolute_sqlite_in_the_project_home(store, tmp_path):
    assert store == f"sqlite:///{tmp_path / 'home' / 'mlflow' / 'mlflow.db'}"


def test_relative_uris_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_tracking_uri("sqlite:///rel/m.db") == f"sqlite:///{tmp_path / 'rel' / 'm.db'}"
    assert tracking.resolve_tracking_uri("runs_dir") == (tmp_path / "runs_dir").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.resolve_tracking_uri() == "http://127.0.0.1:5999"


def test_unreachable_server_fails_fast_with_its_address():
    import socket

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EdsrRayError, match=f"127.0.0.1:{port} is unreachable"):
        tracking.check_tracking_uri(f"http://127.0.0.1:{port}", timeout_s=2)


def test_run_is_reused_until_finished_and_logs_land_in_artifact_root(store, tmp_path):
    cfg = TrackingConfig(experiment="t")
    run_id = tracking.find_or_create_run(cfg, "runs/a", "a", store, resume=True)  # nothing to resume: a new run
    assert tracking.find_or_create_run(cfg, "runs/a", "a", store, resume=True) == run_id  # a resume continues it
    assert tracking.find_or_create_run(cfg, "runs/b", "b", store, resume=True) != run_id
    logger = tracking.RunLogger(run_id, store)
    logger.log_params({"train.lr": 1e-4, "model.n_feats": 8})
    logger.log_params({"train.lr": 1e-4})  # logging again on resume is not an error
    logger.log_metrics({"loss": 0.5, "nan": float("nan")}, step=3)
    picture = (np.arange(8 * 20 * 3) % 251).astype(np.uint8).reshape(8, 20, 3)
    logger.log_image(picture, "validation/step_3.png")
    logger.end()

    mlflow = tracking.mlflow_module()
    client = mlflow.MlflowClient(tracking_uri=store)
    run = client.get_run(run_id)
    assert run.data.params["train.lr"] == "0.0001"
    assert run.data.metrics == {"loss": 0.5}
    assert run.info.artifact_uri.startswith((tmp_path / "home" / "mlflow" / "artifacts").as_uri())
    assert [f.path for f in client.list_artifacts(run_id, "validation")] == ["validation/step_3.png"]
    local = client.download_artifacts(run_id, "validation/step_3.png", str(tmp_path / "download"))
    np.testing.assert_array_equal(decode_image(Path(local).read_bytes()).rgb, picture)  # the picture, losslessly
    # Resuming a finished run continues it; a fresh training run under the same key starts a new MLflow run.
    assert tracking.find_or_create_run(cfg, "runs/a", "a", store, resume=True) == run_id
    assert mlflow.MlflowClient(tracking_uri=store).get_run(run_id).info.status == "RUNNING"
    assert tracking.find_or_create_run(cfg, "runs/a", "a", store, resume=False) != run_id


def test_log_register_and_download_model(store, tmp_path):
    from edsr_ray.models import EDSR
    from edsr_ray.weights import load_model, save_model

    cfg = TrackingConfig(experiment="t")
    run_id = tracking.find_or_create_run(cfg, "runs/m", "m", store, resume=False)
    logger = tracking.RunLogger(run_id, store)
    model = EDSR(1, 8, 2)
    model_uri = log_model(logger, save_model(model, tmp_path / "model.pt"), metrics={"val_psnr": 30.5})
    assert model_uri.startswith("models:/m-")
    assert logger.register("tiny", model_uri, aliases=("best",)) == "1"
    assert logger.register("tiny", model_uri) == "2"
    client = tracking.mlflow_module().MlflowClient(tracking_uri=store)
    assert client.get_run(run_id).info.status == "RUNNING"  # logging a model leaves the run as it was
    for ref in ("models:/tiny/1", "models:/tiny@best", "models:/tiny/latest", f"runs:/{run_id}/model"):
        path = Path(tracking.download_model_uri(ref, store, dst_path=str(tmp_path / ref.replace("/", "_"))))
        assert (path / "MLmodel").is_file(), ref
        loaded = load_model(path / "data" / "model.pt")
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items()), ref
    with pytest.raises(EdsrRayError, match="models:/nope/1"):
        tracking.download_model_uri("models:/nope/1", store)


def test_comparison_picture_is_three_crops_side_by_side():
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)
    bic, sr = hr // 2, hr // 3
    pic = tracking.comparison_picture(bic, sr, hr, crop=100)
    assert pic.shape == (100, 3 * 100 + 2 * 4, 3)
    top, left = 100, 80
    np.testing.assert_array_equal(pic[:, :100], bic[top : top + 100, left : left + 100])
    np.testing.assert_array_equal(pic[:, 104:204], sr[top : top + 100, left : left + 100])
    np.testing.assert_array_equal(pic[:, 208:], hr[top : top + 100, left : left + 100])


def test_mlflow_speaks_through_this_process_logging(caplog):
    import logging

    tracking.mlflow_module()
    logger = logging.getLogger("mlflow")
    assert logger.propagate and not [h for h in logger.handlers if type(h) is logging.StreamHandler]
    with caplog.at_level(logging.INFO):
        logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
    assert [r.name for r in caplog.records] == ["mlflow.store.db.utils"]
