"""edsr_ray.training.elastic against a real sqlite MLflow store: the record of each restart of the worker group (from,
to, why, updates redone) and the checkpoint clock. The resizes themselves, on a two-node cluster, are in
test_training_multinode.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from edsr_ray import tracking
from edsr_ray.config import TrackingConfig
from edsr_ray.training import elastic


@pytest.fixture
def logger(tmp_path, monkeypatch):
    monkeypatch.setenv("EDSR_RAY_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.resolve_tracking_uri()
    run_id = tracking.find_or_create_run(TrackingConfig(experiment="t"), "runs/e", "e", uri, resume=False)
    return tracking.RunLogger(run_id, uri)


def _records(logger, tmp_path) -> list[dict]:
    client = tracking.mlflow_module().MlflowClient(tracking_uri=logger.uri)
    paths = [a.path for a in client.list_artifacts(logger.run_id, "resizes")]
    return [
        json.loads(Path(client.download_artifacts(logger.run_id, p, str(tmp_path / "dl"))).read_text()) for p in paths
    ]


def test_each_group_start_logs_its_size_and_each_restart_one_record(logger, tmp_path):
    job_start = time.time() - 1
    # The run's first group: its size, no record.
    assert elastic.record_group_start(logger, 2, 0, None, job_start) is None
    logger.log_metrics({"loss": 1.0, elastic.WORKERS_METRIC: 2}, 50)
    time.sleep(0.01)  # MLflow timestamps are in milliseconds
    # A node of the group was drained for preemption: the checkpoint of update 40 carries the notice.
    notice = {"deadline": 1000.0, "seen": 990.0, "nodes": ["b"], "ranks": [1]}
    lost = elastic.record_group_start(logger, 1, 40, {"notice": notice}, job_start)
    assert (lost.from_workers, lost.to_workers, lost.resumed_from, lost.redone) == (2, 1, 40, 10)
    assert lost.why == "nodes lost: preempted, seen 10 s before its deadline"
    assert lost.line().startswith("workers 2 -> 1 at update 40 (nodes lost: preempted")
    logger.log_metrics({"loss": 0.9}, 60)
    time.sleep(0.01)
    grown = elastic.record_group_start(logger, 2, 60, {"notice": None}, job_start)
    assert (grown.from_workers, grown.to_workers, grown.why, grown.redone) == (1, 2, "nodes added", 0)
    time.sleep(0.01)
    again = elastic.record_group_start(logger, 2, 60, {"notice": None}, job_start)
    assert again.why == "workers restarted after a failure"
    time.sleep(0.01)
    assert elastic.record_group_start(logger, 1, 60, None, job_start).why == "nodes lost: without notice"
    time.sleep(0.01)
    # A new job of the same run (re-submitted): the previous group belongs to an earlier job.
    assert elastic.record_group_start(logger, 1, 60, None, time.time() + 1).why == "run resumed by a new job"

    client = tracking.mlflow_module().MlflowClient(tracking_uri=logger.uri)
    sizes = [m.value for m in sorted(client.get_metric_history(logger.run_id, "workers"), key=lambda m: m.timestamp)]
    assert sizes == [2, 2, 1, 2, 2, 1, 1]
    counts = sorted(client.get_metric_history(logger.run_id, "resizes"), key=lambda m: m.timestamp)
    assert [m.value for m in counts] == [1, 2, 2, 3, 3]  # restarts at the same size are recorded, not counted
    records = _records(logger, tmp_path)
    assert len(records) == 5 and {(r["from_workers"], r["to_workers"]) for r in records} == {
        (2, 1),
        (1, 2),
        (2, 2),
        (1, 1),
    }
    assert client.get_run(logger.run_id).data.tags["last_resize"].startswith("workers 1 -> 1 at update 60")


def test_checkpoint_clock():
    assert not elastic.CheckpointClock(None).due()
    clock = elastic.CheckpointClock(0.05)
    assert not clock.due()
    time.sleep(0.06)
    assert clock.due()
    clock.reset()
    assert not clock.due()
