"""Training on Ray Train V2 against the real services: embedded S3 (data and checkpoints), local Ray, sqlite MLflow.
The driver (edsr_ray.training.run), the worker loop (edsr_ray.training.loop) and its checkpoints, end to end."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sample_data import ROOT

from edsr_ray import storage, tracking
from edsr_ray.config import ExperimentConfig, from_dict
from edsr_ray.errors import EdsrRayError
from edsr_ray.mlflow_model import log_model
from edsr_ray.models import build_model
from edsr_ray.training.run import NonFiniteLossError, _has_checkpoints, preflight, run_training
from edsr_ray.weights import load_model, save_model

# --------------------------------------------------------------------------------------------------------------------
# On Ray


@pytest.fixture(scope="module")
def env(s3, sample_root, tmp_path_factory):
    """Local Ray (4 logical CPUs: 2 train workers + Ray Data), the ingested sample set, a private MLflow store."""
    import ray

    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDSR_RAY_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        ray.init(
            address="local",
            num_cpus=4,
            object_store_memory=300 * 2**20,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"EDSR_RAY_HOME": str(home), "MLFLOW_DISABLE_TELEMETRY": "true"}},
        )
        try:
            yield home
        finally:
            ray.shutdown()


def _config(name: str, **sections) -> ExperimentConfig:
    data = {
        "model": {"arch": "edsr", "n_resblocks": 1, "n_feats": 8, "scales": [2]},
        "data": {
            "root": ROOT,
            "train_range": [1, 800],
            "val_range": [801, 900],
            "patch_size": 16,
            "patches_per_image": 16,
            "epoch_patches": 96,
            "val_max_size": 96,
        },
        "train": {"batch_size": 4, "lr": 1e-3, "lr_step": 5, "total_steps": 8, "val_every": 4, "log_every": 2},
        "workers": {"num_workers": 2, "cpus_per_worker": 1},
        "run": {"name": name, "storage_path": "s3://edsr/train-tests/runs", "max_failures": 0},
        "tracking": {"experiment": "train-tests", "registered_model": f"{name}-model"},
        "storage": {},
    }
    for section, values in sections.items():
        data[section] = {**data[section], **values}
    return from_dict(ExperimentConfig, data)


def _run_metrics(run_id: str, key: str) -> list[tuple[int, float]]:
    client = tracking.mlflow_module().MlflowClient(tracking_uri=tracking.resolve_tracking_uri())
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.slow
def test_two_workers_train_validate_checkpoint_and_register(env):
    cfg = _config("basic")
    outcome = run_training(cfg)
    assert outcome.steps == 8
    # Validation beside bicubic on the same images, per scale, with the paper's protocol.
    for key in ("val_psnr_x2", "val_ssim_x2", "val_bicubic_psnr_x2", "val_bicubic_ssim_x2"):
        assert np.isfinite(outcome.metrics[key]), key
    assert 0 < outcome.metrics["val_ssim_x2"] <= 1
    # The checkpoint is on S3, and load_model reads the model straight from its folder.
    assert outcome.checkpoint_path.startswith("edsr/train-tests/runs/basic/")
    ckpt_uri = f"s3://{outcome.checkpoint_path}"
    assert storage.exists(storage.join(ckpt_uri, "train_state.pt"))
    model = load_model(ckpt_uri)
    assert model.config == cfg.model

    # MLflow: params, curves, pictures, and registered models that load at any size.
    client = tracking.mlflow_module().MlflowClient(tracking_uri=tracking.resolve_tracking_uri())
    run = client.get_run(outcome.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.n_feats"] == "8" and run.data.params["train.lr"] == "0.001"
    assert [s for s, _ in _run_metrics(outcome.mlflow_run_id, "loss")] == [2, 4, 6, 8]
    assert [s for s, _ in _run_metrics(outcome.mlflow_run_id, "val_psnr_x2")] == [4, 8]
    pictures = [f.path for f in client.list_artifacts(outcome.mlflow_run_id, "validation")]
    assert pictures == ["validation/step_00000004.png", "validation/step_00000008.png"]
    assert set(outcome.registered) == {"final", "best"}
    # Both are MLflow models carrying the validation metrics of their own checkpoint.
    mlflow = tracking.mlflow_module()
    with tracking.fluent_tracking_uri(tracking.resolve_tracking_uri()):
        for alias in ("final", "best"):
            info = mlflow.models.get_model_info(f"models:/{cfg.tracking.registered_model}@{alias}")
            assert info.flavors["python_function"]["loader_module"] == "edsr_ray.mlflow_model"
            assert info.metadata["model_config"]["n_feats"] == 8
            assert info.metadata["source_run_id"] == outcome.mlflow_run_id
            assert info.metadata["metrics"]["val_psnr_x2"] in [
                v for _, v in _run_metrics(outcome.mlflow_run_id, "val_psnr_x2")
            ]
        final = mlflow.models.get_model_info(f"models:/{cfg.tracking.registered_model}@final")
        assert final.metadata["metrics"]["val_psnr_x2"] == pytest.approx(outcome.metrics["val_psnr_x2"])
    registered = load_model(f"models:/{cfg.tracking.registered_model}@final")
    x = torch.rand(1, 3, 23, 37) * 255
    with torch.inference_mode():
        torch.testing.assert_close(registered(x), model(x))
    assert registered(x).shape == (1, 3, 46, 74)


@pytest.mark.slow
def test_resume_continues_the_schedule_without_decaying_twice(env):
    first = run_training(_config("resume"))
    assert first.steps == 8
    # Same run name and storage, more updates: continues from the latest checkpoint (step 8). The second part runs
    # compiled (DDP model under torch.compile, the learning rate in a tensor): the schedule carries over all the same.
    cfg = _config("resume", train={"total_steps": 12, "compile": True})
    second = run_training(cfg)
    assert second.steps == 12
    assert second.mlflow_run_id == first.mlflow_run_id  # the same MLflow run goes on
    assert _run_metrics(second.mlflow_run_id, "resumed_from_step") == [(8, 8.0)]
    # lr after 12 updates with lr_step 5: 1e-3 * 0.5 ** 2, exactly once per boundary (the official code halves again
    # on every resume).
    lrs = dict(_run_metrics(second.mlflow_run_id, "lr"))
    for step in (2, 4, 6, 8, 10, 12):
        assert lrs[step] == pytest.approx(1e-3 * 0.5 ** (step // 5)), step
    state = torch.load(_download(second.checkpoint_path, "train_state.pt"), weights_only=True)
    assert state["step"] == 12 and state["scheduler"]["last_epoch"] == 12


@pytest.mark.slow
def test_uneven_shares_and_a_checkpoint_by_time(env):
    """A global batch of 5 over 2 workers (3 + 2 patches): every update used 5 patches, as the workers counted them.
    With run.checkpoint_every_s, checkpoints are written between validations, unvalidated, and never "best"."""
    cfg = _config(
        "bytime",
        train={"batch_size": 5, "total_steps": 24, "val_every": 24, "log_every": 2},
        run={"checkpoint_every_s": 0.5, "num_to_keep": 50},
    )
    outcome = run_training(cfg)
    assert outcome.steps == 24
    counts = _run_metrics(outcome.mlflow_run_id, "patches_per_update_min")
    counts += _run_metrics(outcome.mlflow_run_id, "patches_per_update_max")
    assert sorted({s for s, _ in counts}) == list(range(2, 25, 2)) and {v for _, v in counts} == {5.0}
    assert {v for _, v in _run_metrics(outcome.mlflow_run_id, "workers")} == {2.0}
    metas = [
        json.loads(storage.read_bytes(uri))
        for uri in storage.list_files("s3://edsr/train-tests/runs/bytime")
        if uri.endswith("/meta.json")
    ]
    by_time = [m for m in metas if m["reason"] == "time"]
    assert by_time, [m["step"] for m in metas]  # at least one; how many depends on the machine's speed
    assert all(m["step"] % 24 and m["metrics"]["val_psnr"] == -1.0 and m["workers"] == 2 for m in by_time)
    assert [m["step"] for m in metas if m["reason"] == "validation"] == [24]
    assert outcome.best_checkpoint_path == outcome.checkpoint_path  # the validated one, not a time checkpoint


def _download(checkpoint_path: str, name: str):
    import io

    return io.BytesIO(storage.read_bytes(f"s3://{checkpoint_path}/{name}"))


@pytest.mark.slow
def test_nonfinite_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(env):
    # A huge learning rate blows the weights up in the first update: the loss of update 2 is no longer finite.
    cfg = _config("nan", train={"lr": 1e30, "lr_gamma": 1.0, "total_steps": 40, "val_every": 1})
    with pytest.raises(NonFiniteLossError, match=r"NaN/Inf at update 2; stopped, the last good checkpoint is kept"):
        run_training(cfg)
    # Losses are read back once per window (6 updates here): the non-finite one is still named exactly, and no
    # checkpoint was written from the broken weights.
    cfg = _config("nan-window", train={"lr": 1e30, "lr_gamma": 1.0, "total_steps": 40, "val_every": 6, "log_every": 6})
    with pytest.raises(NonFiniteLossError, match=r"NaN/Inf at update 2; stopped, no checkpoint had been written yet"):
        run_training(cfg)
    assert not _has_checkpoints(cfg)


def _train_worker_pids(home: Path) -> list[int]:
    """Ray Train worker processes of this test's Ray instance (recognised by the EDSR_RAY_HOME it gave them)."""
    marker = f"EDSR_RAY_HOME={home}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if b"RayTrainWorker" in cmdline and marker in environ.split(b"\0"):
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_a_killed_worker_restarts_the_group_from_the_latest_checkpoint(env):
    cfg = _config("fault", train={"total_steps": 48, "val_every": 4}, run={"max_failures": 2})
    snapshot = "s3://edsr/train-tests/runs/fault/checkpoint_manager_snapshot.json"
    killed: list[int] = []

    def killer():
        # Kill a worker once the controller has registered a checkpoint (Ray Train writes its snapshot then).
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                registered = json.loads(storage.read_bytes(snapshot)).get("latest_checkpoint_result") is not None
            except (storage.NotFoundError, ValueError):
                registered = False
            pids = _train_worker_pids(env)
            if registered and pids:
                os.kill(pids[-1], signal.SIGKILL)
                killed.append(pids[-1])
                return
            time.sleep(0.1)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    outcome = run_training(cfg)
    thread.join(timeout=5)
    assert killed, "no training worker was killed"
    assert outcome.steps == 48
    resumed = _run_metrics(outcome.mlflow_run_id, "resumed_from_step")
    assert resumed and all(step % 4 == 0 and 4 <= step < 48 for step, _ in resumed)


def test_preflight_fails_fast_on_bad_data_and_wrong_init_weights(env, tmp_path):
    with pytest.raises(EdsrRayError, match="manifest"):
        preflight(_config("pre", data={"root": "s3://edsr/train-tests/nothing-here"}))
    x3 = tmp_path / "x3_wide.pt"
    save_model(build_model(from_dict(ExperimentConfig, {"model": {"n_resblocks": 2, "n_feats": 16}}).model), x3)
    with pytest.raises(EdsrRayError, match=r"n_feats|n_resblocks"):
        preflight(_config("pre", train={"init_from": str(x3)}))


def test_preflight_names_an_unreachable_object_store(env, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _config("pre", storage={"endpoint_url": f"http://127.0.0.1:{port}", "max_attempts": 2})
    started = time.monotonic()
    with pytest.raises(EdsrRayError, match=f"127.0.0.1:{port}"):
        preflight(cfg)
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_mdsr_trains_and_validates_every_scale_with_two_workers(env):
    cfg = _config(
        "mdsr",
        model={"arch": "mdsr", "n_resblocks": 1, "n_feats": 8, "scales": [2, 3, 4]},
        data={"epoch_patches": 144},
        train={"total_steps": 6, "val_every": 6},
    )
    outcome = run_training(cfg)
    assert outcome.steps == 6
    for scale in (2, 3, 4):
        assert np.isfinite(outcome.metrics[f"val_psnr_x{scale}"]) and np.isfinite(outcome.metrics[f"val_ssim_x{scale}"])
    assert load_model(f"s3://{outcome.checkpoint_path}").scales == (2, 3, 4)


def test_x3_initialises_from_a_registered_x2_model(env, tmp_path):
    """The paper's x2 -> x3 chain through the registry: preflight checks the config's models:/...@alias before any
    cluster work, and the same alias initialises the x3 model, copying what matches."""
    from edsr_ray.weights import init_from

    x2 = build_model(_config("x2").model)
    model_file = tmp_path / "model.pt"
    save_model(x2, model_file)
    uri = tracking.resolve_tracking_uri()
    run_id = tracking.find_or_create_run(_config("x2").tracking, "chain/x2", "x2", uri, resume=False)
    logger = tracking.RunLogger(run_id, uri)
    logger.register("chain-x2", log_model(logger, model_file), aliases=("best",))
    cfg = _config("x3", model={"scales": [3]}, train={"init_from": "models:/chain-x2@best"})
    preflight(cfg)  # resolves and checks the initial weights before any cluster work
    x3 = build_model(cfg.model)
    report = init_from(x3, cfg.train.init_from)  # the alias, resolved through the registry
    assert sorted(report.left_at_init) == ["tail.0.0.bias", "tail.0.0.weight"]
    torch.testing.assert_close(x3.state_dict()["body.0.body.0.weight"], x2.state_dict()["body.0.body.0.weight"])
