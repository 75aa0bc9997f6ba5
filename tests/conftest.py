"""Shared fixtures. Real services only: Ray, the embedded S3 server and MLflow are started here, never mocked."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

# Nothing the tests start may call outside the machine.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real photographs (uint8 RGB) shipped with scikit-image, keyed by name."""
    from edsr_ray.samples import photos

    return photos()


@pytest.fixture
def photo(photos) -> np.ndarray:
    """One real photograph, 400x600 RGB."""
    return photos["coffee"]


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A running embedded S3 server (SeaweedFS on 127.0.0.1) with bucket ``edsr``, shared by the whole session.

    Its ``AWS_*`` variables (endpoint, credentials, region) are set in ``os.environ`` for the session, so
    ``edsr_ray.storage`` with ``cfg=None``, pyarrow, Ray workers and MLflow all reach it; they are restored afterwards.
    """
    from edsr_ray.objectstore import EmbeddedS3

    with EmbeddedS3(tmp_path_factory.mktemp("s3"), buckets=("edsr",)) as server, pytest.MonkeyPatch.context() as mp:
        for key, value in server.env().items():
            mp.setenv(key, value)
        yield server
