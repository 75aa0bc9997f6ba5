"""The project home: one folder (``$EDSR_RAY_HOME``, default ``~/.edsr-ray``) that holds everything the project keeps
on this machine, and the name of every place inside it.

Layout::

    objectstore/    the embedded S3 server started by ``jobs/objectstore.py`` (its data, state file and log)
    mlflow/         the default MLflow store: mlflow.db (sqlite) and artifacts/
    runs/           training checkpoints when ``run.storage_path`` is not set
    quickstart/     the quickstart's S3 data
    logs/           one log per command run: everything that is not the command's own progress (Ray's messages)

Every function reads the variable when called, so a process that sets it (the tests, a job's environment) moves
everything at once; nothing is created here.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "EDSR_RAY_HOME"
DEFAULT_HOME = "~/.edsr-ray"


def home() -> Path:
    """The project home, absolute (``$EDSR_RAY_HOME``, else ``~/.edsr-ray``)."""
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser().resolve()


def objectstore_dir() -> Path:
    """Data folder of the embedded S3 server that ``jobs/objectstore.py`` runs in the background."""
    return home() / "objectstore"


def mlflow_db() -> Path:
    """The sqlite file of the default MLflow store; its artifacts live in ``artifacts/`` beside it."""
    return home() / "mlflow" / "mlflow.db"


def runs_dir() -> Path:
    """Where training runs keep their checkpoints when the config names no ``run.storage_path``."""
    return home() / "runs"


def quickstart_dir() -> Path:
    """The quickstart's embedded S3 data."""
    return home() / "quickstart"


def logs_dir() -> Path:
    """Per-run logs of the commands in ``jobs/``."""
    return home() / "logs"
