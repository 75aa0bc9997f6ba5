"""Shared fixtures. Real services only: Ray, the embedded S3 server and MLflow are started here, never mocked."""

from __future__ import annotations

import os
import socket
import stat
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from edsr_ray.infra.ray import quiet_environment

quiet_environment()  # nothing the tests start may call outside the machine
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and a shared, busy CI core makes thread handoffs slow."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def strip():
    """``strip(shape, dtype=np.uint8)``: an image such as 1xN or Nx1 (cheap at any length, for size limits) whose
    samples vary along it, so a wrong size or order shows in its pixels."""

    def make(shape: tuple[int, ...], dtype=np.uint8) -> np.ndarray:
        values = np.arange(int(np.prod(shape)), dtype=np.int64) * 7919
        return (values % (65521 if dtype == np.uint16 else 251)).astype(dtype).reshape(shape)

    return make


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
    from edsr_ray.infra.objectstore import EmbeddedS3

    with EmbeddedS3(tmp_path_factory.mktemp("s3"), buckets=("edsr",)) as server, pytest.MonkeyPatch.context() as mp:
        for key, value in server.env().items():
            mp.setenv(key, value)
        yield server


SAMPLE_DIV2K_IDS = ("0001", "0002", "0003", "0004", "0005", "0006", "0801", "0802")


@pytest.fixture(scope="session")
def sample_div2k(tmp_path_factory, photos):
    """A small DIV2K-layout folder of real photos, HR only: 6 training images 0001-0006 and 2 validation images
    0801-0802, cropped to different sizes that are multiples of 12 (as DIV2K's are), the smallest 216x288."""
    from PIL import Image

    root = tmp_path_factory.mktemp("sample") / "DIV2K"
    names = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "hubble_deep_field", "ihc", "retina")
    for i, (image_id, name) in enumerate(zip(SAMPLE_DIV2K_IDS, names)):
        img = photos[name]
        h, w = min(img.shape[0], 216 + 24 * i) // 12 * 12, min(img.shape[1], 288 + 36 * i) // 12 * 12
        split = "train" if int(image_id) <= 800 else "valid"
        folder = root / f"DIV2K_{split}_HR"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[:h, :w]).save(folder / f"{image_id}.png")
    return root


@pytest.fixture(scope="module")
def ray_data(s3):
    """Local Ray with 4 logical CPUs on the 2-core machine: 2 for Train workers, the rest for Ray Data."""
    import ray

    ray.init(address="local", num_cpus=4, object_store_memory=300 * 2**20, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_root(s3, sample_div2k) -> str:
    """:func:`sample_div2k` ingested once per session into the embedded S3 server, with its manifest (on a Ray of its
    own when none runs yet, stopped again afterwards)."""
    import ray
    from sample_data import ROOT

    from edsr_ray.infra.ray import stop_ray
    from edsr_ray.ingest import ingest

    started = not ray.is_initialized()
    try:
        report = ingest([str(sample_div2k)], ROOT, progress=False)
    finally:
        if started:
            stop_ray()
    assert report.failed == []
    return ROOT


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A tiny random-weight EDSR x2 (2 blocks, 8 features) in a project checkpoint file."""
    from edsr_ray.models import EDSR
    from edsr_ray.weights import save_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny_x2.pt"
    save_model(EDSR(2, 8, 2), path)
    return path


@pytest.fixture(scope="module")
def model(model_file):
    """The network of :func:`model_file`, loaded."""
    from edsr_ray.weights import load_model

    return load_model(model_file)


# --------------------------------------------------------------------------------------------------------------------
# Hostile inputs


def _finishes(call, seconds: float = 30.0):
    """Run ``call`` in a daemon thread; fail (rather than hang the suite) if it has not returned within ``seconds``."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # re-raised in the test's thread below
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


@pytest.fixture(scope="session")
def finishes():
    """``finishes(call, seconds=30)``: the call's result; a call that blocks fails the test instead of hanging it."""
    return _finishes


def _block_device() -> str | None:
    with os.scandir("/dev") as entries:
        return next((e.path for e in entries if stat.S_ISBLK(e.stat(follow_symlinks=False).st_mode)), None)


def _make_special_files(folder: Path) -> dict[str, str]:
    """Every kind of non-regular file in ``folder``, named like an image: file name -> words its failure must name."""
    os.mkfifo(folder / "fifo.png")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(folder / "socket.png"))
    (folder / "folder.png").mkdir()
    (folder / "zero.png").symlink_to("/dev/zero")
    (folder / "null.jpg").symlink_to("/dev/null")
    (folder / "to_fifo.jpg").symlink_to(folder / "fifo.png")
    (folder / "to_folder.png").symlink_to(folder / "folder.png", target_is_directory=True)
    (folder / "dangling.png").symlink_to(folder / "gone.png")
    (folder / "loop_a.png").symlink_to(folder / "loop_b.png")
    (folder / "loop_b.png").symlink_to(folder / "loop_a.png")
    expected = {
        "fifo.png": "not a regular file: a FIFO",
        "socket.png": "not a regular file: a socket",
        "folder.png": "not a regular file: a directory",
        "zero.png": "not a regular file: a character device reached through a symbolic link",
        "null.jpg": "not a regular file: a character device reached through a symbolic link",
        "to_fifo.jpg": "not a regular file: a FIFO (named pipe) reached through a symbolic link",
        "to_folder.png": "not a regular file: a directory reached through a symbolic link",
        "dangling.png": "not a regular file: a dangling symbolic link",
        "loop_a.png": "not a regular file: a loop of symbolic links",
        "loop_b.png": "not a regular file: a loop of symbolic links",
    }
    device = _block_device()
    if device is not None:  # containers often have none
        (folder / "disk.png").symlink_to(device)
        expected["disk.png"] = "not a regular file: a block device reached through a symbolic link"
    return expected


@pytest.fixture(scope="session")
def special_files():
    """``special_files(folder)``: FIFOs, a socket, devices, a folder and broken links named like images, made in
    ``folder``; returns file name -> the words its failure reason must contain. ``folder.png`` is a real folder (a
    folder walk enters it); every other name is listed by a walk."""
    return _make_special_files


@pytest.fixture(scope="module")
def lr_input() -> torch.Tensor:
    """A 12x10 crop of a real photo, (1, 3, 12, 10) float in [0, 255]."""
    from edsr_ray.samples import photos

    crop = photos()["coffee"][100:112, 200:210]
    # contiguous NCHW: a permuted (channels-last) view would send the convs down a much slower path on CPU
    return torch.from_numpy(np.array(crop)).permute(2, 0, 1)[None].float().contiguous()


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A fresh MLflow store on sqlite in this test's own project home; its tracking URI."""
    from edsr_ray import tracking

    monkeypatch.setenv("EDSR_RAY_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.resolve_tracking_uri()
    tracking.check_tracking_uri(uri)
    return uri
