"""edsr_ray.storage against local folders and the embedded SeaweedFS S3 server (no mocks)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import socket
import stat
import threading
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from edsr_ray import storage
from edsr_ray.config import StorageConfig
from edsr_ray.errors import StorageError
from edsr_ray.storage import NotFoundError


@pytest.fixture
def prefix(s3) -> str:
    """A fresh ``s3://edsr/<unique>`` prefix, so tests sharing the session server never see each other's objects."""
    return f"s3://edsr/test-{uuid.uuid4().hex[:12]}"


def _dead_port() -> int:
    """A loopback port nothing listens on (bound and released, never listened on)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------------------------------
# URIs


def test_uri_helpers():
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/tmp/x") and not storage.is_s3(Path("s3:/b"))
    assert storage.split_s3("s3://bucket/a/b.png") == ("bucket", "a/b.png")
    assert storage.split_s3("s3://bucket") == ("bucket", "")
    assert storage.join("s3://b", "a/", "/c.png") == "s3://b/a/c.png"
    assert storage.join("s3://b/root/", "x") == "s3://b/root/x"
    assert storage.join("/data", "", "hr", "0001.png") == "/data/hr/0001.png"
    assert storage.join("", "rel") == "rel"
    with pytest.raises(StorageError, match=r"'\.\.'"):
        storage.join("s3://b/root", "../other")
    with pytest.raises(StorageError, match="s3:///key"):
        storage.split_s3("s3:///key")
    with pytest.raises(StorageError, match="unsupported scheme 'gs'"):
        storage.read_bytes("gs://bucket/key")
    with pytest.raises(StorageError, match="invalid bucket name 'Bad_Name'"):
        storage.check_bucket_name("Bad_Name")


# --------------------------------------------------------------------------------------------------------------------
# Local files


def test_local_round_trip(tmp_path):
    root = str(tmp_path / "ds")
    files = {"b/0002.png": b"png2", "a/0001.PNG": b"png1", "a/deep/x.jpg": b"jpg", "notes.txt": b"txt"}
    for rel, data in files.items():
        storage.write_bytes(storage.join(root, rel), data)  # parent folders are created
    for rel, data in files.items():
        assert storage.read_bytes(storage.join(root, rel)) == data
        assert storage.stat_size(storage.join(root, rel)) == len(data)
    assert storage.list_files(root) == sorted(storage.join(root, rel) for rel in files)
    assert storage.list_files(root, suffixes=(".png", ".jpg")) == [
        f"{root}/a/0001.PNG",
        f"{root}/a/deep/x.jpg",
        f"{root}/b/0002.png",
    ]
    assert storage.list_files(f"{root}/notes.txt") == [f"{root}/notes.txt"]
    # file:// URIs name the same files and list in their own form.
    assert storage.read_bytes(f"file://{root}/notes.txt") == b"txt"
    assert storage.list_files(f"file://{root}/b") == [f"file://{root}/b/0002.png"]
    assert storage.exists(root) and storage.exists(f"{root}/notes.txt") and not storage.exists(f"{root}/nope")
    storage.delete(f"{root}/notes.txt")
    storage.delete(f"{root}/notes.txt")  # deleting what is gone is fine, as in S3
    assert not storage.exists(f"{root}/notes.txt")
    with pytest.raises(StorageError, match="is a directory"):
        storage.delete(f"{root}/a")


def test_local_paths_expand_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    storage.write_bytes("~/x/y.bin", b"home")
    assert (tmp_path / "x" / "y.bin").read_bytes() == b"home"
    fs, path = storage.resolve_pyarrow("~/x/y.bin")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "x" / "y.bin")
    with fs.open_input_file(path) as f:
        assert f.read() == b"home"


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "out" / "model.pt"
    for i in range(5):
        storage.write_bytes(str(target), bytes([i]) * (1000 + i))
    assert target.read_bytes() == bytes([4]) * 1004
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.pt"]
    # Same permissions as a file created with open(), not mkstemp's 0600.
    reference = tmp_path / "reference"
    reference.write_bytes(b"")
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)

    # A write that fails after the temporary file was written (the target is a folder) removes it again.
    (tmp_path / "out" / "folder").mkdir()
    (tmp_path / "out" / "folder" / "keep").write_bytes(b"k")
    with pytest.raises(StorageError, match="folder"):
        storage.write_bytes(str(tmp_path / "out" / "folder"), b"data")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["folder", "model.pt"]
    assert (tmp_path / "out" / "folder" / "keep").read_bytes() == b"k"


def test_local_listing_skips_temporary_files_of_writes_in_progress(tmp_path):
    storage.write_bytes(str(tmp_path / "a.png"), b"a")
    (tmp_path / f".b.png.x1y2{storage.TMP_SUFFIX}").write_bytes(b"partial")
    assert storage.list_files(str(tmp_path)) == [f"{tmp_path}/a.png"]


def test_local_missing_files_name_the_path(tmp_path):
    missing = str(tmp_path / "nope" / "img.png")
    for call in (storage.read_bytes, storage.stat_size, storage.list_files):
        with pytest.raises(NotFoundError, match=str(tmp_path / "nope")) as info:
            call(missing)
        assert isinstance(info.value, FileNotFoundError)


# --------------------------------------------------------------------------------------------------------------------
# S3


def test_s3_round_trip(prefix):
    files = {"hr/0002.png": b"2" * 10, "hr/0001.png": b"1" * 5, "lr/x2/0001.png": b"l", "manifest.parquet": b"pq"}
    for rel, data in files.items():
        storage.write_bytes(storage.join(prefix, rel), data)
    for rel, data in files.items():
        assert storage.read_bytes(storage.join(prefix, rel)) == data
        assert storage.stat_size(storage.join(prefix, rel)) == len(data)
    assert storage.list_files(prefix) == sorted(storage.join(prefix, rel) for rel in files)
    assert storage.list_files(prefix, suffixes=".png") == [
        f"{prefix}/hr/0001.png",
        f"{prefix}/hr/0002.png",
        f"{prefix}/lr/x2/0001.png",
    ]
    assert storage.list_files(f"{prefix}/hr/") == [f"{prefix}/hr/0001.png", f"{prefix}/hr/0002.png"]
    # A prefix is a folder: "hr" does not match "hrx/...".
    storage.write_bytes(f"{prefix}/hrx/other.png", b"o")
    assert storage.list_files(f"{prefix}/hr") == [f"{prefix}/hr/0001.png", f"{prefix}/hr/0002.png"]
    assert storage.list_files(f"{prefix}/manifest.parquet") == [f"{prefix}/manifest.parquet"]
    assert storage.list_files(f"{prefix}/empty") == []
    assert storage.exists(f"{prefix}/hr/0001.png") and storage.exists(f"{prefix}/lr") and storage.exists(prefix)
    assert storage.exists("s3://edsr")
    assert not storage.exists(f"{prefix}/hr/0003.png") and not storage.exists(f"{prefix}/h")
    storage.write_bytes(f"{prefix}/hr/0001.png", b"new")  # overwrite
    assert storage.read_bytes(f"{prefix}/hr/0001.png") == b"new"
    storage.delete(f"{prefix}/hr/0001.png")
    storage.delete(f"{prefix}/hr/0001.png")
    assert not storage.exists(f"{prefix}/hr/0001.png")


def test_s3_listing_follows_pages(prefix):
    keys = [f"{prefix}/img/{i:04d}.png" for i in range(23)]
    for key in reversed(keys):
        storage.write_bytes(key, key.encode())
    storage.write_bytes(f"{prefix}/img/readme.txt", b"r")
    # 24 objects in pages of 7: a listing that stopped after one page would return 7.
    assert storage.list_files(prefix, suffixes=".png", page_size=7) == keys
    assert len(storage.list_files(prefix, page_size=7)) == 24
    with pytest.raises(StorageError, match="page_size"):
        storage.list_files(prefix, page_size=0)


def test_s3_large_objects_use_multipart_upload(prefix, monkeypatch):
    # S3's smallest part is 5 MiB; lower the threshold so 11 MiB goes up as three parts.
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 6 * 1024 * 1024)
    monkeypatch.setattr(storage, "MULTIPART_CHUNK", 5 * 1024 * 1024)
    data = os.urandom(11 * 1024 * 1024)
    uri = f"{prefix}/big.bin"
    storage.write_bytes(uri, data)
    assert storage.read_bytes(uri) == data
    bucket, key = storage.split_s3(uri)
    client = storage.s3_client()
    assert client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"').endswith("-3")  # a 3-part upload
    assert not client.list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads")


def test_pyarrow_and_boto3_see_the_same_objects(prefix):
    storage.write_bytes(f"{prefix}/a/one.bin", b"written by boto3")
    fs, path = storage.resolve_pyarrow(f"{prefix}/a/one.bin")
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{prefix[5:]}/a/one.bin"
    with fs.open_input_file(path) as f:
        assert f.read() == b"written by boto3"
    fs, root = storage.resolve_pyarrow(prefix)
    with fs.open_output_stream(f"{root}/b/two.bin") as f:
        f.write(b"written by pyarrow")
    assert storage.read_bytes(f"{prefix}/b/two.bin") == b"written by pyarrow"
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    from_pyarrow = sorted(f"s3://{i.path}" for i in infos if i.type == pafs.FileType.File)
    assert from_pyarrow == storage.list_files(prefix)
    assert storage.pyarrow_filesystem() is fs  # cached with the client
    # Ray pickles the filesystem to its workers: endpoint and credentials must survive that.
    with pickle.loads(pickle.dumps(fs)).open_input_file(f"{root}/a/one.bin") as f:
        assert f.read() == b"written by boto3"


def test_missing_objects_and_buckets_name_the_uri(s3, prefix):
    uri = f"{prefix}/no/such.png"
    for call in (storage.read_bytes, storage.stat_size):
        with pytest.raises(NotFoundError) as info:
            call(uri)
        assert uri in str(info.value) and s3.endpoint_url in str(info.value)
        assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(NotFoundError, match="bucket 'no-such-bucket' does not exist"):
        storage.list_files("s3://no-such-bucket/data")
    assert not storage.exists("s3://no-such-bucket/data/x.png")
    with pytest.raises(StorageError, match="names a bucket, not an object"):
        storage.read_bytes("s3://edsr")


def test_down_endpoint_fails_fast_with_a_clear_error(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-checked-by-a-server-that-is-down")
    endpoint = f"http://127.0.0.1:{_dead_port()}"
    cfg = StorageConfig(endpoint_url=endpoint, max_attempts=5)
    for call in (storage.read_bytes, storage.exists, storage.list_files):
        start = time.monotonic()
        with pytest.raises(StorageError) as info:
            call("s3://edsr/some/key.png", cfg)
        elapsed = time.monotonic() - start
        message = str(info.value)
        assert endpoint in message and "s3://edsr/some/key.png" in message and "unreachable" in message
        assert elapsed < 10, f"a refused connection took {elapsed:.1f} s to report"  # a hang would hit the timeout


@pytest.mark.parametrize("wrong", ["secret", "access_key"])
def test_wrong_credentials_give_a_clear_error_without_the_secret(s3, prefix, monkeypatch, caplog, wrong):
    storage.write_bytes(f"{prefix}/k.bin", b"x")
    bad_secret = "Wr0ng-" + uuid.uuid4().hex
    if wrong == "secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", bad_secret)
        expected = "SignatureDoesNotMatch"
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
        expected = "InvalidAccessKeyId"
    caplog.set_level(logging.DEBUG)  # botocore's debug logging included
    with pytest.raises(StorageError) as info:
        storage.read_bytes(f"{prefix}/k.bin")
    message = str(info.value)
    assert expected in message and s3.endpoint_url in message and f"{prefix}/k.bin" in message
    chain = f"{message} {info.value.__cause__!r} {info.value.__cause__}"
    logs = caplog.text + "".join(str(r.args) for r in caplog.records)
    for secret in (bad_secret, s3.secret_key):
        assert secret not in chain
        assert secret not in logs
    assert caplog.records, "debug logging was not captured, so the check above proved nothing"


def test_storage_config_overrides_the_environment(s3, prefix, monkeypatch):
    storage.write_bytes(f"{prefix}/k.bin", b"cfg")
    dead = f"http://127.0.0.1:{_dead_port()}"
    # The config wins over the environment ...
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    assert storage.read_bytes(f"{prefix}/k.bin", StorageConfig(endpoint_url=s3.endpoint_url)) == b"cfg"
    with pytest.raises(StorageError, match=dead):
        storage.read_bytes(f"{prefix}/k.bin")
    # ... and the S3-specific variable wins over the generic one, as in the AWS SDKs.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint_url)
    assert storage.read_bytes(f"{prefix}/k.bin") == b"cfg"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "localhost:9000")
    with pytest.raises(StorageError, match="AWS_ENDPOINT_URL_S3='localhost:9000' must start with http"):
        storage.read_bytes(f"{prefix}/k.bin")


def test_named_profile_supplies_credentials_to_boto3_and_pyarrow(s3, prefix, tmp_path, monkeypatch):
    storage.write_bytes(f"{prefix}/k.bin", b"profile")
    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"[edsr-test]\naws_access_key_id = {s3.access_key}\naws_secret_access_key = {s3.secret_key}\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    cfg = StorageConfig(endpoint_url=s3.endpoint_url, profile="edsr-test")
    assert storage.read_bytes(f"{prefix}/k.bin", cfg) == b"profile"
    fs, path = storage.resolve_pyarrow(f"{prefix}/k.bin", cfg)
    with fs.open_input_file(path) as f:
        assert f.read() == b"profile"
    with pytest.raises(StorageError, match="profile 'missing' is not defined"):
        storage.read_bytes(f"{prefix}/k.bin", StorageConfig(endpoint_url=s3.endpoint_url, profile="missing"))
    # No credentials anywhere: a clear error rather than an anonymous request or a metadata-service probe.
    with pytest.raises(StorageError, match="no AWS credentials found"):
        storage.read_bytes(f"{prefix}/k.bin")


def test_ensure_bucket_creates_once(s3):
    name = f"edsr-{uuid.uuid4().hex[:8]}"
    assert not storage.exists(f"s3://{name}")
    storage.ensure_bucket(name)
    storage.ensure_bucket(name)  # idempotent
    assert storage.exists(f"s3://{name}")
    storage.write_bytes(f"s3://{name}/a", b"a")
    assert storage.list_files(f"s3://{name}") == [f"s3://{name}/a"]
    with pytest.raises(StorageError, match="invalid bucket name"):
        storage.ensure_bucket("UPPER")


def test_clients_are_cached_per_settings_and_shared_by_threads(s3, monkeypatch):
    cfg = StorageConfig(endpoint_url=s3.endpoint_url, max_attempts=2)
    seen = []

    def grab() -> None:
        seen.append(storage.s3_client(cfg))

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(c) for c in seen}) == 1
    assert storage.s3_client(StorageConfig(endpoint_url=s3.endpoint_url, max_attempts=3)) is not seen[0]
    assert seen[0].meta.config.retries == {"total_max_attempts": 2, "mode": "standard"}
    monkeypatch.setenv("AWS_REGION", "eu-west-1")  # a changed environment gets a fresh client
    fresh = storage.s3_client(cfg)
    assert fresh is not seen[0] and fresh.meta.region_name == "eu-west-1"


def _child_client_id(queue, uri: str) -> None:
    queue.put((id(storage.s3_client()), storage.read_bytes(uri)))


def test_forked_processes_build_their_own_client(prefix):
    storage.write_bytes(f"{prefix}/k.bin", b"fork")
    parent = storage.s3_client()
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_client_id, args=(queue, f"{prefix}/k.bin"))
    proc.start()
    child_id, data = queue.get(timeout=30)
    proc.join(30)
    assert proc.exitcode == 0 and data == b"fork"
    assert child_id != id(parent)  # the parent's client, copied by fork, stays alive there: a new one was built
