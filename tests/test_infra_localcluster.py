"""Jobs on a local multi-process Ray cluster, submitted the way users submit them.

The cluster is a ``ray start --head`` node and a second ``ray start`` node on this machine
(:mod:`edsr_ray.infra.localcluster`: free ports everywhere, temp dirs of its own, token authentication on). Each job
goes through the real command line::

    ray job submit --address http://127.0.0.1:PORT --working-dir . --runtime-env-json '{"env_vars": {...}}' \\
        --no-wait -- python jobs/XXX.py ...

run from the repository root, and the test then waits for a terminal status through the Jobs API.

How the jobs get code and settings, as they would on a real cluster:

* code: ``--working-dir .`` uploads the repository (Ray leaves out what .gitignore lists, e.g. the venv), so
  ``python jobs/train.py --config configs/quickstart.yaml`` runs the uploaded copy, which Ray puts first on the job's
  and its workers' ``PYTHONPATH``; the venv's editable install of the same package stands behind it;
* settings: the embedded S3 server's endpoint and credentials and ``EDSR_RAY_HOME`` (where the sqlite MLflow store
  lives) go in ``--runtime-env-json`` ``env_vars``, which reach the job driver and every actor it starts. Variables
  that the jobs pass to ``ray.init`` themselves (``MLFLOW_DISABLE_TELEMETRY``, ``RAY_USAGE_STATS_ENABLED``) must stay
  out of it: Ray refuses to merge a job's and a driver's value for the same variable. The nodes set both.

The jobs run in order: ingest the quickstart's sample set, train the quickstart config made tiny, upscale with the
registered model, evaluate the registered model and bicubic; and a training job with a bad config, which must show
FAILED. More jobs: call :func:`submit_and_wait` with the entry point and :data:`job_env`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from edsr_ray import storage, tracking
from edsr_ray.infra.localcluster import LocalCluster, NodeSpec, find_ray

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
BASE = "s3://edsr/cluster-jobs"
DATA = f"{BASE}/div2k"
MODEL_NAME = "cluster-quickstart"
TOTAL_STEPS = 24
# The quickstart config (2 Ray Train workers, validation, checkpoints to S3, MLflow, registry) made tiny.
TRAIN_OVERRIDES = (
    f"data.root={DATA}",
    "model.n_resblocks=1",
    "model.n_feats=8",
    "data.patch_size=16",
    "data.patches_per_image=16",
    "data.epoch_patches=192",
    "data.val_max_size=96",
    "train.batch_size=4",
    f"train.total_steps={TOTAL_STEPS}",
    "train.val_every=12",
    "train.log_every=6",
    f"run.storage_path={BASE}/runs",
    "run.name=cluster-quickstart",
    "tracking.experiment=cluster-jobs",
    f"tracking.registered_model={MODEL_NAME}",
)


@dataclass(frozen=True)
class JobRun:
    """A finished job: its submission id, terminal status, the Jobs API's message and the driver's output."""

    job_id: str
    status: str
    message: str
    logs: str
    seconds: float


def submit_job(cluster: LocalCluster, entrypoint: Sequence[str], env_vars: Mapping[str, str]) -> str:
    """``ray job submit --no-wait`` from the repository root with ``--working-dir .``; returns the submission id."""
    job_id = f"edsr-test-{Path(entrypoint[1]).stem}-{uuid.uuid4().hex[:8]}"
    command = [
        find_ray(),
        "job",
        "submit",
        f"--address={cluster.dashboard_url}",
        f"--submission-id={job_id}",
        "--working-dir=.",
        f"--runtime-env-json={json.dumps({'env_vars': dict(env_vars)})}",
        "--no-wait",
        "--",
        *entrypoint,
    ]
    done = subprocess.run(
        command, cwd=REPO, env={**os.environ, **cluster.env()}, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, f"`ray job submit` failed:\n{done.stdout}\n{done.stderr}"
    return job_id


def wait_for_job(cluster: LocalCluster, job_id: str, timeout_s: float = 600) -> JobRun:
    """Poll the Jobs API until the job reaches a terminal status."""
    client = cluster.job_client()
    start = time.monotonic()
    deadline = start + timeout_s
    while not (status := client.get_job_status(job_id)).is_terminal():
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            pytest.fail(f"job {job_id} still {status} after {timeout_s:.0f} s:\n{client.get_job_logs(job_id)[-4000:]}")
        time.sleep(1)
    info = client.get_job_info(job_id)
    run = JobRun(job_id, str(status.value), info.message or "", client.get_job_logs(job_id), time.monotonic() - start)
    log.info("job %s: %s after %.1f s of waiting", job_id, run.status, run.seconds)
    return run


def submit_and_wait(
    cluster: LocalCluster, entrypoint: Sequence[str], env_vars: Mapping[str, str], timeout_s: float = 600
) -> JobRun:
    """Submit a job and wait for it; see :func:`submit_job`."""
    return wait_for_job(cluster, submit_job(cluster, entrypoint, env_vars), timeout_s)


def succeeded(run: JobRun) -> bool:
    """Whether the job succeeded; if not, its message and the end of its output go to the test's log."""
    if run.status != "SUCCEEDED":
        log.error("job %s: %s: %s\n%s", run.job_id, run.status, run.message, run.logs[-6000:])
    return run.status == "SUCCEEDED"


# --------------------------------------------------------------------------------------------------------------------
# Fixtures: the cluster, the jobs' environment, the ingested data, the trained model


@pytest.fixture(scope="module")
def cluster(s3):
    """Head (2 CPUs) + one more node (2 CPUs): room for 2 Ray Train workers and the patch stream's read tasks."""
    with LocalCluster([NodeSpec(num_cpus=2), NodeSpec(num_cpus=2)]) as local:
        yield local


@pytest.fixture(scope="module")
def job_env(s3, tmp_path_factory) -> dict[str, str]:
    """What every job gets in --runtime-env-json; this process uses the same MLflow store (EDSR_RAY_HOME)."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDSR_RAY_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield {**s3.env(), "EDSR_RAY_HOME": str(home)}


@pytest.fixture(scope="module")
def dataset(cluster, job_env, tmp_path_factory) -> str:
    """The quickstart's sample set (6 training and 2 validation photos), ingested at x2 by the ingest job."""
    from edsr_ray.quickstart import build_sample_set

    folder = tmp_path_factory.mktemp("samples")
    build_sample_set(folder)
    run = submit_and_wait(
        cluster,
        ["python", "jobs/ingest.py", "--source", str(folder), "--dest", DATA, "--scales", "2", "--no-progress"],
        job_env,
    )
    assert succeeded(run)
    assert "8 images (8 ok)" in run.logs
    return DATA


@pytest.fixture(scope="module")
def bad_config_job(cluster, job_env) -> str:
    """A training job whose override names a key that does not exist; submitted without waiting, so it runs beside
    the training job (``trained`` asks for it first)."""
    return submit_job(
        cluster,
        ["python", "jobs/train.py", "--config", "configs/quickstart.yaml", "train.learning_rate=1e-3"],
        job_env,
    )


@pytest.fixture(scope="module")
def trained(cluster, job_env, dataset, bad_config_job) -> JobRun:
    """The quickstart config, made tiny, trained by `ray job submit` on the two nodes."""
    return submit_and_wait(
        cluster, ["python", "jobs/train.py", "--config", "configs/quickstart.yaml", *TRAIN_OVERRIDES], job_env
    )


# --------------------------------------------------------------------------------------------------------------------
# The cluster itself


def test_two_nodes_with_their_own_ports_and_the_token_required(cluster):
    nodes = cluster.nodes()
    assert sorted((n["state"], n["is_head_node"]) for n in nodes) == [("ALIVE", False), ("ALIVE", True)]
    # Two nodes on one machine: every per-node listener on a port of its own, and each node's metrics answer there.
    head, worker = cluster.ports
    for name in ("agent_http", "agent_grpc", "metrics_export", "runtime_env_agent"):
        assert head[name] != worker[name], name
    for ports in (head, worker):
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics_export']}/metrics", timeout=10) as reply:
            assert reply.status == 200
    # Token authentication is on: the Jobs API refuses a request without the token, and one with a wrong token.
    for headers, status in (({}, 401), ({"Authorization": "Bearer " + "0" * 64}, 403)):
        request = urllib.request.Request(f"{cluster.dashboard_url}/api/jobs/", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == status
    assert isinstance(cluster.job_client().list_jobs(), list)  # and the right token is accepted


# --------------------------------------------------------------------------------------------------------------------
# The jobs


def test_training_job_registers_a_model_that_loads_at_any_size(trained):
    from edsr_ray.weights import load_model

    assert succeeded(trained)
    assert f"finished {TOTAL_STEPS} updates" in trained.logs
    assert f"registered final model: models:/{MODEL_NAME}/" in trained.logs

    client = tracking.mlflow_module().MlflowClient(tracking_uri=tracking.resolve_tracking_uri())
    version = client.get_model_version_by_alias(MODEL_NAME, "final")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.n_feats"] == "8" and run.data.params["workers.num_workers"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [6, 12, 18, 24]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_psnr_x2")] == [12, 24]

    model = load_model(f"models:/{MODEL_NAME}@final")
    assert (model.config.n_resblocks, model.config.n_feats, model.scales) == (1, 8, (2,))
    x = torch.rand(1, 3, 23, 37) * 255
    with torch.inference_mode():
        y = model(x)
    assert y.shape == (1, 3, 46, 74) and torch.isfinite(y).all()


def test_upscaling_job_writes_every_output_with_the_registered_model(cluster, job_env, trained):
    """The Ray Data upscaling job on both nodes: CPU model actors (their glibc settings merged into the job's runtime
    env), S3 in and out; every output equals the shared inference path on the same image."""
    from edsr_ray.codecs import decode_image
    from edsr_ray.inference import upscale
    from edsr_ray.weights import load_model

    assert succeeded(trained)
    source, output = f"{DATA}/DIV2K_valid_LR_bicubic/X2", f"{BASE}/upscaled"
    command = ["python", "jobs/upscale.py", "--model", f"models:/{MODEL_NAME}@final", "--input", source]
    run = submit_and_wait(cluster, [*command, "--output", output, "--format", "png", "--workers", "1"], job_env)
    assert succeeded(run)
    assert "upscaled 2 images" in run.logs and "0 failed" in run.logs
    summary = json.loads(storage.read_bytes(f"{output}/_summary.json"))
    assert (summary["written"], summary["failed"], summary["settings"]["mode"]) == (2, 0, "ray")
    assert storage.exists(f"{output}/_manifest.parquet")
    model = load_model(f"models:/{MODEL_NAME}@final")
    for name in ("0801x2.png", "0802x2.png"):
        lr = decode_image(storage.read_bytes(f"{source}/{name}")).rgb
        sr = decode_image(storage.read_bytes(f"{output}/{name}")).rgb
        np.testing.assert_array_equal(sr, upscale(model, lr, 2), err_msg=name)


def test_evaluation_job_scores_the_registered_model_and_bicubic(cluster, job_env, trained):
    from skimage.metrics import peak_signal_noise_ratio

    from edsr_ray.codecs import decode_image
    from edsr_ray.imaging import imresize

    assert succeeded(trained)
    output = f"{BASE}/eval"
    run = submit_and_wait(
        cluster,
        [
            "python",
            "jobs/evaluate.py",
            "--model",
            f"EDSR=models:/{MODEL_NAME}@final",
            "--model",
            "bicubic",
            "--dataset",
            DATA,
            "--sets",
            "DIV2K_valid",
            "--workers",
            "1",
            "--output",
            output,
        ],
        job_env,
    )
    assert succeeded(run)
    table = storage.read_bytes(f"{output}/results.md").decode()
    assert "| DIV2K_valid | ×2 |" in table and "EDSR" in table and "bicubic" in table
    assert storage.exists(f"{output}/results.csv") and not storage.exists(f"{output}/failures.csv")
    results = json.loads(storage.read_bytes(f"{output}/results.json"))
    images = {(r["model"], r["image"]): r for r in results["images"]}
    assert sorted(images) == [("EDSR", "0801"), ("EDSR", "0802"), ("bicubic", "0801"), ("bicubic", "0802")]
    assert all(np.isfinite(r["psnr"]) and 0 < r["ssim"] <= 1 for r in images.values())

    # Bicubic's PSNR on image 0801, recomputed here with scikit-image (DIV2K protocol: RGB, scale + 6 border pixels).
    hr = decode_image(storage.read_bytes(f"{DATA}/DIV2K_valid_HR/0801.png")).rgb
    lr = decode_image(storage.read_bytes(f"{DATA}/DIV2K_valid_LR_bicubic/X2/0801x2.png")).rgb
    sr = imresize(lr, 2)
    b = 2 + 6
    expected = peak_signal_noise_ratio(hr[b:-b, b:-b], sr[b:-b, b:-b], data_range=255)
    assert images[("bicubic", "0801")]["psnr"] == pytest.approx(expected, abs=1e-3)


def test_training_job_with_a_bad_config_fails_and_says_why(cluster, bad_config_job):
    run = wait_for_job(cluster, bad_config_job)
    assert run.status == "FAILED"
    assert "exit code 2" in run.message
    assert "train.learning_rate: unknown key" in run.logs
    assert "Traceback" not in run.logs
