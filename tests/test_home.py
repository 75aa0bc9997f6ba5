"""edsr_ray.home: one folder for everything the project keeps on a machine, moved as a whole by $EDSR_RAY_HOME."""

from __future__ import annotations

from pathlib import Path

from edsr_ray import home, tracking
from edsr_ray.config import RunConfig
from edsr_ray.infra import objectstore


def test_every_place_follows_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("EDSR_RAY_HOME", str(tmp_path / "h"))
    root = tmp_path / "h"
    assert home.home() == root
    places = {
        home.objectstore_dir(): root / "objectstore",
        home.mlflow_db(): root / "mlflow" / "mlflow.db",
        home.runs_dir(): root / "runs",
        home.quickstart_dir(): root / "quickstart",
        home.logs_dir(): root / "logs",
    }
    for got, expected in places.items():
        assert got == expected
    # The users of the home read it from there, not from a path of their own.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri() == f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    assert objectstore.data_folder() == root / "objectstore"
    assert objectstore.data_folder(tmp_path / "elsewhere") == tmp_path / "elsewhere"
    assert RunConfig().location == str(root / "runs")
    assert RunConfig(storage_path="s3://b/runs").location == "s3://b/runs"
    assert not root.exists(), "naming a place creates nothing"


def test_default_is_in_the_user_home(monkeypatch):
    monkeypatch.delenv("EDSR_RAY_HOME", raising=False)
    assert home.home() == Path("~/.edsr-ray").expanduser().resolve()
    monkeypatch.setenv("EDSR_RAY_HOME", "")  # empty counts as unset
    assert home.home() == Path("~/.edsr-ray").expanduser().resolve()
