"""Models as MLflow models (edsr_ray.mlflow_model) against a real MLflow store on sqlite.

Tiny EDSR and MDSR checkpoints are logged and registered the way training does it; one more version is registered
the way versions were registered before (a run artifact folder holding model.pt, no MLmodel). Registered models are
loaded through ``mlflow.pyfunc`` in a fresh process and served by ``mlflow models serve``; their pixels are compared
with :class:`edsr_ray.inference.Upscaler` run here on the original weights.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from edsr_ray import storage, tracking
from edsr_ray.config import TrackingConfig, to_dict
from edsr_ray.errors import ModelLoadError
from edsr_ray.inference import Upscaler
from edsr_ray.mlflow_model import REQUIREMENTS, _load_pyfunc, log_model, requirements
from edsr_ray.models import EDSR, MDSR
from edsr_ray.weights import CHECKPOINT_FORMAT, LOADER_MODULE, load_model, save_model, weights_path

SIZES = ((17, 23), (64, 48), (101, 67))
METRICS = {"val_psnr": 31.25, "val_psnr_x2": 31.25, "val_ssim_x2": 0.91, "step": 8.0}


@dataclass
class Registry:
    uri: str
    home: Path
    run_id: str
    edsr: Path  # weights behind pyfunc-edsr/1 (EDSR x2)
    mdsr: Path  # weights behind pyfunc-mdsr/1 (MDSR x2/x3/x4)
    plain: Path  # weights behind plain-edsr/1 (registered the old way)
    edsr_model_uri: str  # models:/m-<id> of the logged EDSR model


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    home = tmp_path_factory.mktemp("mlflow-model")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDSR_RAY_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        uri = tracking.resolve_tracking_uri()
        tracking.check_tracking_uri(uri)
        cfg = TrackingConfig(experiment="mlflow-model")
        run_id = tracking.find_or_create_run(cfg, "runs/pyfunc", "pyfunc", uri, resume=False)
        logger = tracking.RunLogger(run_id, uri)
        logger.log_metrics(METRICS, step=8)
        torch.manual_seed(0)  # freshly initialised, so the three models differ
        edsr = Path(save_model(EDSR(2, 8, 2), home / "weights" / "edsr.pt"))
        mdsr = Path(save_model(MDSR(1, 8, (2, 3, 4)), home / "weights" / "mdsr.pt"))
        plain = Path(save_model(EDSR(2, 8, 2), home / "plain" / "model.pt"))
        edsr_uri = log_model(logger, edsr, "model_final", metrics={**METRICS, "not_a_number": float("nan")})
        assert logger.register("pyfunc-edsr", edsr_uri, aliases=("best",)) == "1"
        assert logger.register("pyfunc-mdsr", log_model(logger, mdsr, "model_mdsr", metrics=METRICS)) == "1"
        # The layout of versions registered before models were MLflow models: a run artifact folder with model.pt.
        client = tracking.mlflow_module().MlflowClient(tracking_uri=uri)
        client.log_artifacts(run_id, str(plain.parent), "model")
        client.create_registered_model("plain-edsr")
        source = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/model"
        client.create_model_version("plain-edsr", source=source, run_id=run_id)
        logger.end()
        yield Registry(uri, home, run_id, edsr, mdsr, plain, edsr_uri)


@pytest.fixture
def in_registry(registry, monkeypatch):
    """This test's process points at the module's store."""
    monkeypatch.setenv("EDSR_RAY_HOME", str(registry.home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with tracking.fluent_tracking_uri(registry.uri):
        yield registry


def _photo_batches(photos) -> dict[str, np.ndarray]:
    """uint8 (2, h, w, 3) crops of two real photos per size."""
    a, b = photos["motorcycle_right"], photos["chelsea"]
    return {f"{h}x{w}": np.stack([a[40 : 40 + h, 60 : 60 + w], b[20 : 20 + h, 30 : 30 + w]]) for h, w in SIZES}


def _state_equal(model: torch.nn.Module, weights: Path) -> bool:
    expected = load_model(weights).state_dict()
    return all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def test_logged_model_has_flavour_signature_example_and_metadata(in_registry, tmp_path):
    from mlflow.models import Model

    folder = Path(tracking.download_model_uri("models:/pyfunc-edsr/1", dst_path=str(tmp_path)))
    files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    expected = {"MLmodel", "data/model.pt", "requirements.txt", "python_env.yaml", "conda.yaml", "input_example.json"}
    assert expected | {"serving_input_example.json", "code/edsr_ray/mlflow_model.py"} <= files
    assert not any("__pycache__" in f for f in files)
    flavor = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == LOADER_MODULE == "edsr_ray.mlflow_model" and flavor["data"] == "data/model.pt"
    assert _state_equal(load_model(folder / "data" / "model.pt"), in_registry.edsr)

    lines = (folder / "requirements.txt").read_text().split()
    assert set(requirements()) <= set(lines) and {r.split("==")[0] for r in requirements()} == set(REQUIREMENTS)
    assert all("==" in r and "+" not in r for r in requirements())  # pinned, without local build tags (+cpu)

    info = Model.load(str(folder))
    (spec,) = info.signature.inputs.inputs
    assert spec.name is None and spec.type == np.dtype(np.uint8) and spec.shape == (-1, -1, -1, 3)
    assert info.signature.outputs.inputs[0].type == np.dtype(np.uint8)
    params = {p.name: p.default for p in info.signature.params.params}
    assert params == {"scale": 2, "self_ensemble": False, "tile": 0}
    example = np.asarray(json.loads((folder / "input_example.json").read_text())["inputs"])
    assert example.shape == (1, 8, 8, 3) and example.min() >= 0 and example.max() == 255
    assert info.load_input_example_params(str(folder)) == {"scale": 2}

    meta = info.metadata
    assert meta["model_config"] == to_dict(load_model(in_registry.edsr).config)
    assert meta["metrics"] == METRICS  # the non-finite value is left out
    assert meta["source_run_id"] == in_registry.run_id
    assert meta["checkpoint_format"] == CHECKPOINT_FORMAT and meta["edsr_ray_version"]

    mdsr = Model.load(tracking.download_model_uri("models:/pyfunc-mdsr/1", dst_path=str(tmp_path / "mdsr")))
    assert {p.name: p.default for p in mdsr.signature.params.params}["scale"] is None  # MDSR: scale required
    # The registered version points at the logged model (an MLflow 3 LoggedModel of the training run).
    client = tracking.mlflow_module().MlflowClient(tracking_uri=in_registry.uri)
    assert client.get_model_version("pyfunc-edsr", "1").source == in_registry.edsr_model_uri


FRESH_PROCESS = """
import json, sys
import numpy as np
import mlflow
mlflow.set_tracking_uri(sys.argv[1])
batches = np.load(sys.argv[2])
out = {}
for name, scales in (("pyfunc-edsr", (2, None)), ("pyfunc-mdsr", (2, 3, 4))):
    model = mlflow.pyfunc.load_model(f"models:/{name}/1")
    for key in batches.files:
        for s in scales:
            out[f"{name}/{key}/{s}"] = model.predict(batches[key], params=None if s is None else {"scale": s})
np.savez(sys.argv[3], **out)
import edsr_ray.inference
print(json.dumps({"edsr_ray": edsr_ray.inference.__file__}))
"""


def test_pyfunc_predict_in_a_fresh_process_equals_upscaler(in_registry, photos, tmp_path):
    batches = _photo_batches(photos)
    np.savez(tmp_path / "in.npz", **batches)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    script = [sys.executable, "-c", FRESH_PROCESS, in_registry.uri, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")]
    result = subprocess.run(script, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # The loader ran from the package copy inside the model (code/), not from this checkout: the model is complete.
    assert "/code/edsr_ray/inference.py" in json.loads(result.stdout.splitlines()[-1])["edsr_ray"]
    outputs = np.load(tmp_path / "out.npz")
    for name, weights, scales in (
        ("pyfunc-edsr", in_registry.edsr, (2,)),
        ("pyfunc-mdsr", in_registry.mdsr, (2, 3, 4)),
    ):
        up = Upscaler(load_model(weights), precision="fp32", device="cpu")
        for key, x in batches.items():
            for s in scales:
                got = outputs[f"{name}/{key}/{s}"]
                assert got.dtype == np.uint8 and got.shape == (2, x.shape[1] * s, x.shape[2] * s, 3)
                np.testing.assert_array_equal(got, up.upscale_batch(x, s), err_msg=f"{name} {key} x{s}")
    for key in batches:  # EDSR without params: the model's own scale
        np.testing.assert_array_equal(outputs[f"pyfunc-edsr/{key}/None"], outputs[f"pyfunc-edsr/{key}/2"])


def test_pyfunc_errors_are_mlflow_exceptions_with_the_projects_message(in_registry):
    import mlflow
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model("models:/pyfunc-mdsr/1")
    x = np.random.default_rng(0).integers(0, 256, (1, 9, 7, 3), dtype=np.uint8)
    for params, words in (
        (None, "the model upscales by [2, 3, 4]: choose one"),
        ({"scale": 5}, "scale 5 is not one of the model's scales [2, 3, 4]"),
        ({"scale": 2, "tile": 3}, "tile must be >= 8"),
    ):
        with pytest.raises(MlflowException, match=words.replace("[", r"\[").replace("]", r"\]")) as info:
            model.predict(x, params=params)
        assert info.value.error_code == "INVALID_PARAMETER_VALUE"
    # Float pixels are refused, never rounded: by MLflow's schema check, and by the model itself if called directly.
    with pytest.raises(MlflowException, match="dtype"):
        model.predict(x.astype(np.float32), params={"scale": 2})
    direct = _load_pyfunc(str(in_registry.mdsr))
    for bad in (x.astype(np.float32) / 255, x[0], x[..., :2]):
        with pytest.raises(MlflowException, match="expected uint8 \\(N, H, W, 3\\) RGB images"):
            direct.predict(bad, {"scale": 2})
    assert model.predict(np.zeros((0, 5, 6, 3), np.uint8), params={"scale": 3}).shape == (0, 15, 18, 3)
    np.testing.assert_array_equal(
        model.predict(x, params={"scale": 3, "tile": 8, "self_ensemble": True}),
        Upscaler(load_model(in_registry.mdsr), tile=8, self_ensemble=True).upscale_batch(x, 3),
    )


def test_logging_and_loading_leave_the_process_environment_as_it_was(registry, monkeypatch, tmp_path):
    """MLflow's set_tracking_uri writes MLFLOW_TRACKING_URI into the environment; what the project does with MLflow must
    not leave it there, or every process started afterwards (a job, a cluster node) would log into this store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow = tracking.mlflow_module()
    logger = tracking.RunLogger(registry.run_id, registry.uri)
    uri = log_model(logger, registry.edsr, "model_env_check", metrics={})
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert load_model(uri).config.n_feats == 8
    assert "MLFLOW_TRACKING_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///" + str(tmp_path / "elsewhere.db"))
    log_model(logger, registry.edsr, "model_env_check2", metrics={})
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///" + str(tmp_path / "elsewhere.db")
    assert mlflow.get_tracking_uri() == os.environ["MLFLOW_TRACKING_URI"]


def test_load_model_reads_every_registry_layout(in_registry, s3, tmp_path):
    for source in (
        "models:/pyfunc-edsr/1",
        "models:/pyfunc-edsr@best",
        in_registry.edsr_model_uri,
        f"runs:/{in_registry.run_id}/model_final",
    ):
        assert _state_equal(load_model(source), in_registry.edsr), source
    assert _state_equal(load_model("models:/plain-edsr/1"), in_registry.plain)  # registered the old way
    # The model folder itself, on disk and as an S3 prefix (an MLflow artifact store on S3).
    folder = Path(tracking.download_model_uri("models:/pyfunc-mdsr/1", dst_path=str(tmp_path)))
    assert weights_path(folder) == folder / "data" / "model.pt"
    assert _state_equal(load_model(folder), in_registry.mdsr)
    for path in folder.rglob("*"):
        if path.is_file():
            storage.write_bytes(f"s3://edsr/mlflow-models/mdsr/{path.relative_to(folder)}", path.read_bytes())
    for prefix in ("s3://edsr/mlflow-models/mdsr", "s3://edsr/mlflow-models/mdsr/"):
        assert _state_equal(load_model(prefix), in_registry.mdsr), prefix


@pytest.mark.parametrize(
    ("mlmodel", "words"),
    [
        ({"flavors": {"python_function": {"loader_module": "mlflow.pytorch", "data": "data"}}}, "another kind"),
        ({"flavors": {"python_function": {"loader_module": LOADER_MODULE, "data": "../model.pt"}}}, "names no weights"),
        ({"flavors": {"sklearn": {}}}, "without a python_function flavour"),
        ("[not: a mapping", "not a readable MLmodel"),
    ],
)
def test_foreign_mlflow_models_are_refused_by_name(tmp_path, mlmodel, words):
    (tmp_path / "model.pt").write_bytes(b"")
    (tmp_path / "MLmodel").write_text(mlmodel if isinstance(mlmodel, str) else yaml.safe_dump(mlmodel))
    with pytest.raises(ModelLoadError, match=words) as info:
        load_model(tmp_path)
    assert str(tmp_path / "MLmodel") in str(info.value)


IMPORTS = """
import json, sys
import numpy as np
import mlflow.pyfunc  # MLflow's own imports (some optional, such as tqdm) are MLflow's business
before = set(sys.modules)
from edsr_ray.mlflow_model import _load_pyfunc
_load_pyfunc(sys.argv[1]).predict(np.zeros((1, 9, 7, 3), np.uint8), {"scale": 3})
new = {m.partition(".")[0] for m in set(sys.modules) - before}
print(json.dumps(sorted(new - set(sys.stdlib_module_names) - {"edsr_ray"})))
"""


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _dependency_closure(names) -> set[str]:
    """The distributions ``names`` need, transitively (their declared requirements, without extras)."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [_canonical(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            declared = requires(name) or []
        except PackageNotFoundError:
            continue
        for line in declared:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(_canonical(req.name))
    return seen


def test_pinned_requirements_cover_what_the_loader_imports(registry):
    from importlib.metadata import packages_distributions

    result = subprocess.run(
        [sys.executable, "-c", IMPORTS, str(registry.mdsr)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    modules = json.loads(result.stdout.splitlines()[-1])
    owners = packages_distributions()  # top-level module -> distributions (several for namespaces such as google)
    closure = _dependency_closure(REQUIREMENTS)
    found = {m: {_canonical(d) for d in owners[m]} for m in modules if m in owners}  # others are generated modules
    assert {"torch", "pillow"} <= set().union(*found.values())  # the check sees the real imports
    assert {m: dists for m, dists in found.items() if not dists & closure} == {}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(port: int, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_upscaler_pixels(registry, photos, tmp_path):
    """``mlflow models serve`` with the local environment (installs nothing, needs no network) on loopback."""
    port = _free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": registry.uri,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # uvicorn of this venv
    }
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/pyfunc-edsr/1"]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow models serve exited with {server.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow models serve did not answer /ping within 180 s:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        x = _photo_batches(photos)["17x23"]
        expected = Upscaler(load_model(registry.edsr), precision="fp32", device="cpu").upscale_batch(x, 2)
        for payload in ({"inputs": x.tolist(), "params": {"scale": 2}}, {"inputs": x.tolist()}):
            status, body = _post(port, payload)
            assert status == 200, body
            np.testing.assert_array_equal(np.asarray(body["predictions"], dtype=np.uint8), expected)
        status, body = _post(port, {"inputs": x.tolist(), "params": {"scale": 5}})
        assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE"
        assert "scale 5 does not match the model, which upscales by 2 only" in body["message"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the uvicorn it started: this test's process group
        server.wait(timeout=60)
