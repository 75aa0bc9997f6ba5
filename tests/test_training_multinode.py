"""Ray Train across nodes: two gloo workers on the two ``ray start`` nodes of a local cluster, fed by the Ray Data
patch stream from the embedded S3 server, tracked in a private sqlite MLflow store."""

from __future__ import annotations

import io

import pytest
import torch

from edsr_ray import storage, tracking
from edsr_ray.config import ExperimentConfig, from_dict
from edsr_ray.infra.localcluster import LocalCluster, NodeSpec
from edsr_ray.training.run import run_training

ROOT = "s3://edsr/multinode-tests/div2k"
RUNS = "s3://edsr/multinode-tests/runs"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(s3, sample_div2k, tmp_path_factory):
    """Two nodes of 2 CPUs each (a train worker + a Ray Data read task per node), this process connected as the
    driver, the sample set ingested at x2."""
    import ray

    from edsr_ray.ingest import ingest

    home = tmp_path_factory.mktemp("home")
    job_env = {**s3.env(), "EDSR_RAY_HOME": str(home), "MLFLOW_DISABLE_TELEMETRY": "true"}
    with LocalCluster([NodeSpec(num_cpus=2), NodeSpec(num_cpus=2)]) as local, pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDSR_RAY_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        # Environment for every worker the driver starts, as a job would pass it (--runtime-env-json).
        local.connect(runtime_env={"env_vars": job_env}, log_to_driver=False)
        try:
            report = ingest([str(sample_div2k)], ROOT, scales=(2,), progress=False)
            assert report.failed == []
            yield local
        finally:
            ray.shutdown()


def _config(name: str, **workers) -> ExperimentConfig:
    return from_dict(
        ExperimentConfig,
        {
            "model": {"arch": "edsr", "n_resblocks": 1, "n_feats": 8, "scales": [2]},
            "data": {
                "root": ROOT,
                "val_range": [801, 900],
                "patch_size": 16,
                "patches_per_image": 16,
                "epoch_patches": 96,
                "val_max_size": 96,
            },
            "train": {"batch_size": 4, "lr": 1e-3, "total_steps": 8, "val_every": 4, "log_every": 2},
            "workers": {"num_workers": 2, "cpus_per_worker": 1, **workers},
            "run": {"name": name, "storage_path": RUNS, "max_failures": 0},
            "tracking": {"experiment": "multinode-tests", "log_images": False},
        },
    )


def _train_worker_nodes(cluster: LocalCluster) -> dict[str, str]:
    """actor id -> node id of every Ray Train worker this cluster has run (the state API keeps dead actors)."""
    from ray.util.state import list_actors

    actors = list_actors(
        address=cluster.dashboard_url,  # never auto-detected: other Ray instances may run on this machine
        filters=[("class_name", "=", "RayTrainWorker")],
        detail=True,
        raise_on_missing_output=False,
    )
    return {a.actor_id: a.node_id for a in actors}


def test_two_gloo_workers_on_different_nodes_train_from_s3(cluster):
    cfg = _config("spread", placement_strategy="STRICT_SPREAD")
    outcome = run_training(cfg)

    # One worker on each node of the cluster.
    node_ids = {n["node_id"] for n in cluster.nodes() if n["state"] == "ALIVE"}
    assert len(node_ids) == 2
    workers = _train_worker_nodes(cluster)
    assert len(workers) == 2, workers
    assert set(workers.values()) == node_ids

    # The run went the whole way: every update happened (the gradients of both ranks were all-reduced across the
    # nodes in each of them), was logged, validated and checkpointed.
    assert outcome.steps == 8
    client = tracking.mlflow_module().MlflowClient(tracking_uri=tracking.resolve_tracking_uri())
    assert client.get_run(outcome.mlflow_run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(outcome.mlflow_run_id, "loss")] == [2, 4, 6, 8]
    assert [m.step for m in client.get_metric_history(outcome.mlflow_run_id, "val_psnr_x2")] == [4, 8]
    state = torch.load(
        io.BytesIO(storage.read_bytes(f"s3://{outcome.checkpoint_path}/train_state.pt")), weights_only=True
    )
    assert state["step"] == 8 and state["scheduler"]["last_epoch"] == 8
