"""edsr_ray.storage against local folders and the embedded SeaweedFS S3 server (no mocks)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import re
import socket
import stat
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

from edsr_ray import storage
from edsr_ray.errors import LocationError, StorageError
from edsr_ray.storage import NotFoundError, StorageConfig


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
    with pytest.raises(LocationError, match="unsupported scheme 'gs://'"):
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


# --------------------------------------------------------------------------------------------------------------------
# Large files: publishing a local file, reading in ranges


def test_write_file_publishes_a_local_file_atomically(tmp_path, special_files):
    source = tmp_path / "joined.mkv"
    source.write_bytes(os.urandom(3 * storage.READ_CHUNK + 17))  # several copy chunks
    target = tmp_path / "out" / "deep" / "film.mkv"
    storage.write_file(str(target), source)
    assert target.read_bytes() == source.read_bytes() and source.exists()  # the source stays
    source.write_bytes(b"second version")
    storage.write_file(f"file://{target}", str(source))
    assert target.read_bytes() == b"second version"
    assert sorted(p.name for p in target.parent.iterdir()) == ["film.mkv"]  # no temporary file left
    reference = tmp_path / "reference"
    reference.write_bytes(b"")
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)
    with pytest.raises(StorageError, match="ends with '/'"):
        storage.write_file(f"{tmp_path}/out/", source)
    with pytest.raises(NotFoundError, match=r"nope\.mkv: no such file"):
        storage.write_file(str(target), tmp_path / "nope.mkv")
    special = tmp_path / "special"
    special.mkdir()
    special_files(special)
    with pytest.raises(storage.NotRegularFileError, match=r"fifo\.png: not a regular file: a FIFO"):
        storage.write_file(str(target), special / "fifo.png")
    assert target.read_bytes() == b"second version"


def test_write_file_uploads_large_files_in_parts_from_disk(prefix, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 6 * 1024 * 1024)
    monkeypatch.setattr(storage, "MULTIPART_CHUNK", 5 * 1024 * 1024)
    client = storage.s3_client()
    for size, parts in ((11 * 1024 * 1024, 3), (1000, None)):
        source = tmp_path / f"{size}.bin"
        source.write_bytes(os.urandom(size))
        uri = f"{prefix}/films/{size}.bin"
        storage.write_file(uri, source)
        assert storage.read_bytes(uri) == source.read_bytes()
        bucket, key = storage.split_s3(uri)
        etag = client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
        assert etag.endswith(f"-{parts}") if parts else "-" not in etag  # a 3-part upload, or one PUT
        assert not client.list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads")
    with pytest.raises(StorageError, match="ends with '/'"):
        storage.write_file(f"{prefix}/films/", source)


def test_open_reader_reads_any_range_of_files_and_objects(prefix, tmp_path):
    data = os.urandom(300_000)
    path = tmp_path / "video.bin"
    path.write_bytes(data)
    uri = f"{prefix}/video.bin"
    storage.write_bytes(uri, data)
    rng = np.random.default_rng(3)
    for where in (str(path), uri):
        with storage.open_reader(where, block_size=64 << 10, cache_blocks=2) as reader:
            assert reader.seekable() and reader.readable()
            for _ in range(30):
                start, n = int(rng.integers(0, len(data))), int(rng.integers(0, 100_000))
                assert reader.seek(start) == start
                assert reader.read(n) == data[start : start + n]
                assert reader.tell() == min(start + n, len(data))
            reader.seek(-10, os.SEEK_END)
            assert reader.read() == data[-10:] and reader.read(5) == b""
    with storage.open_reader(uri, block_size=64 << 10, cache_blocks=2) as reader:
        assert reader.read() == data
        assert reader.requests == 5  # ceil(300,000 / 65,536) ranged GETs, each block once
        reader.seek(0)
        reader.read(10)
        assert reader.requests == 6  # block 0 had left the two-block cache
        with pytest.raises(StorageError, match="negative position"):
            reader.seek(-1)


def test_open_reader_fails_by_name_on_missing_special_and_replaced_files(prefix, tmp_path, special_files):
    with pytest.raises(NotFoundError, match=re.escape(f"{prefix}/nope.bin")):
        storage.open_reader(f"{prefix}/nope.bin")
    with pytest.raises(NotFoundError, match=r"nope\.bin"):
        storage.open_reader(str(tmp_path / "nope.bin"))
    special_files(tmp_path)
    with pytest.raises(storage.NotRegularFileError, match=r"fifo\.png: not a regular file: a FIFO"):
        storage.open_reader(str(tmp_path / "fifo.png"))
    uri = f"{prefix}/replaced.bin"
    storage.write_bytes(uri, b"a" * 100_000)
    with storage.open_reader(uri, block_size=50_000, cache_blocks=1) as reader:
        assert reader.read(10) == b"a" * 10
        storage.write_bytes(uri, b"b" * 100_000)  # replaced while it is being read
        reader.seek(60_000)
        with pytest.raises(StorageError, match=r"replaced\.bin: the object changed while it was being read"):
            reader.read(10)


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


# --------------------------------------------------------------------------------------------------------------------
# Hostile inputs: special files, foreign schemes, oversized and slow reads


def test_special_files_fail_by_name_at_once_and_are_listed(tmp_path, special_files, finishes):
    expected = special_files(tmp_path)
    (tmp_path / "real.png").write_bytes(b"a regular file")
    for name, words in expected.items():
        uri = str(tmp_path / name)
        for call in (lambda u=uri: storage.read_bytes(u), lambda u=uri: storage.read_head(u, 16)):
            with pytest.raises(storage.NotRegularFileError) as info:
                finishes(call)
            assert str(info.value).startswith(f"{uri}: not a regular file: ") and words in str(info.value), name
        with pytest.raises(storage.NotRegularFileError, match=re.escape(words)):
            storage.check_regular_file(f"file://{uri}")
    # Listed like files (a link to a folder is not followed), so that every reader reports them instead of skipping.
    listed = {Path(u).name for u in finishes(lambda: storage.list_files(str(tmp_path)))}
    assert listed == (set(expected) - {"folder.png"}) | {"real.png"}
    assert storage.list_files(str(tmp_path / "fifo.png")) == [str(tmp_path / "fifo.png")]
    assert storage.read_bytes(str(tmp_path / "real.png")) == b"a regular file"


def test_local_reads_are_bounded_in_bytes(tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(bytes(range(256)) * 40)  # 10,240 bytes
    assert storage.read_bytes(str(path), max_bytes=10_240) == path.read_bytes()
    with pytest.raises(StorageError, match=r"big\.bin: 10,240 bytes is more than the 10,239 bytes one read may take"):
        storage.read_bytes(str(path), max_bytes=10_239)
    # The setting is the default limit.
    with pytest.raises(StorageError, match="the max_read_bytes limit"):
        storage.read_bytes(str(path), StorageConfig(max_read_bytes=100))
    # A file whose size stat() does not know (/proc) is still cut at the limit while it is read.
    with pytest.raises(StorageError, match="more than 64 bytes"):
        storage.read_bytes("/proc/self/status", max_bytes=64)
    assert b"Name:" in storage.read_bytes("/proc/self/status")
    assert storage.read_head(str(path), 5) == (bytes(range(5)), 10_240)
    assert storage.read_head(str(path), 1 << 20) == (path.read_bytes(), 10_240)


def test_s3_reads_are_bounded_in_bytes(prefix):
    data = bytes(range(256)) * 20  # 5,120 bytes
    storage.write_bytes(f"{prefix}/obj.bin", data)
    storage.write_bytes(f"{prefix}/empty", b"")
    assert storage.read_bytes(f"{prefix}/obj.bin", max_bytes=5120) == data
    with pytest.raises(StorageError, match=r"obj\.bin: 5,120 bytes is more than the 5,119 bytes one read may take"):
        storage.read_bytes(f"{prefix}/obj.bin", max_bytes=5119)
    with pytest.raises(StorageError, match="the max_read_bytes limit"):
        storage.read_bytes(f"{prefix}/obj.bin", StorageConfig(max_read_bytes=1000))
    assert storage.read_head(f"{prefix}/obj.bin", 16) == (data[:16], 5120)
    assert storage.read_head(f"{prefix}/obj.bin", 1 << 20) == (data, 5120)
    assert storage.read_head(f"{prefix}/empty", 16) == (b"", 0)


class HostileS3:
    """A loopback HTTP server answering every GET the way an S3 endpoint should not: a body that never ends (chunked,
    no length), or one dripped a byte at a time. The embedded S3 server cannot be made to misbehave, and these are
    the cases the bounds exist for."""

    def __init__(self, mode: str, drip_s: float = 0.05):
        self.mode, self.drip_s = mode, drip_s
        self.sent = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(65536)
                if self.mode == "endless":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n")
                    chunk = b"%x\r\n%s\r\n" % (65536, b"\0" * 65536)
                    while not self.stop.is_set():
                        conn.sendall(chunk)
                        self.sent += 65536
                else:  # drip
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n")
                    while not self.stop.is_set():
                        conn.sendall(b"\0")
                        self.sent += 1
                        time.sleep(self.drip_s)
            except OSError:
                return  # the client gave up: what the tests want

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


@pytest.mark.parametrize("mode", ["endless", "drip"])
def test_s3_reads_stop_at_the_byte_cap_and_the_time_budget(mode, monkeypatch, finishes):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-checked-by-this-server")
    server = HostileS3(mode)
    try:
        cfg = StorageConfig(endpoint_url=server.endpoint, max_attempts=2, max_read_bytes=4 << 20, read_budget_s=1.5)
        start = time.monotonic()
        with pytest.raises(StorageError) as info:
            finishes(lambda: storage.read_bytes("s3://edsr/hostile.png", cfg), seconds=30)
        elapsed = time.monotonic() - start
    finally:
        server.close()
    message = str(info.value)
    assert "s3://edsr/hostile.png" in message
    if mode == "endless":
        assert "more than 4,194,304 bytes" in message and "max_read_bytes" in message
        assert server.sent < 64 << 20  # stopped near the cap, not after reading on and on
    else:
        assert "not finished within 1.5 s" in message and "read_budget_s" in message
        assert 1.4 < elapsed < 10, elapsed  # the budget covers the whole read, attempts included
        assert 0 < server.sent < 200


@pytest.mark.parametrize(
    ("text", "allowed", "kind"),
    [
        ("s3://bucket/key", storage.DATA_LOCATIONS, storage.S3),
        ("/data/in", storage.DATA_LOCATIONS, storage.LOCAL),
        ("relative/in", storage.DATA_LOCATIONS, storage.LOCAL),
        ("./gs:bucket/x", storage.DATA_LOCATIONS, storage.LOCAL),
        ("~/in", storage.DATA_LOCATIONS, storage.LOCAL),
        ("file:///data/in", storage.DATA_LOCATIONS, storage.LOCAL),
        ("2024-01-01T10:00/in", storage.DATA_LOCATIONS, storage.LOCAL),  # starts with a digit: no scheme
        ("models:/edsr/1", storage.MODEL_LOCATIONS, storage.MLFLOW),
        ("runs:/abc/model", storage.MODEL_LOCATIONS, storage.MLFLOW),
        (Path("gs:bucket"), storage.DATA_LOCATIONS, storage.LOCAL),  # a Path object is a local path by definition
    ],
)
def test_location_kinds(text, allowed, kind):
    assert storage.location_kind(text, allowed) == kind


@pytest.mark.parametrize(
    ("text", "allowed", "words"),
    [
        ("gs://bucket/out", storage.DATA_LOCATIONS, ["unsupported scheme 'gs://'"]),
        ("S3://bucket/out", storage.DATA_LOCATIONS, ["unsupported scheme 'S3://'", "did you mean s3://?"]),
        ("s3a://bucket/out", storage.DATA_LOCATIONS, ["unsupported scheme 's3a://'", "did you mean s3://?"]),
        ("s3n://bucket/out", storage.DATA_LOCATIONS, ["unsupported scheme 's3n://'", "did you mean s3://?"]),
        ("ftp://host/x", storage.DATA_LOCATIONS, ["unsupported scheme 'ftp://'"]),
        ("http://host/x.pt", storage.MODEL_LOCATIONS, ["unsupported scheme 'http://'"]),
        ("https://host/x.pt", storage.MODEL_LOCATIONS, ["unsupported scheme 'https://'"]),
        ("FILE:///x", storage.DATA_LOCATIONS, ["unsupported scheme 'FILE://'", "did you mean file://?"]),
        ("gs:bucket/out", storage.DATA_LOCATIONS, ["unsupported scheme 'gs:'", "write ./gs:bucket/out"]),
        ("s3:bucket", storage.DATA_LOCATIONS, ["unsupported scheme 's3:'", "did you mean s3://?", "./s3:bucket"]),
        ("models:edsr", storage.MODEL_LOCATIONS, ["unsupported scheme 'models:'", "did you mean models:/?"]),
        ("models:/edsr/1", storage.DATA_LOCATIONS, ["an MLflow models:/ or runs:/ URI is not supported here"]),
        ("s3://bucket/x", (storage.LOCAL,), ["s3://bucket/key is not supported here"]),
    ],
)
def test_foreign_schemes_are_refused_naming_what_is_supported(text, allowed, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LocationError) as info:
        storage.location_kind(text, allowed, what="--output")
    message = str(info.value)
    assert message.startswith(f"--output {text}: ")
    for word in words:
        assert word in message
    supported = [name for kind, name in storage._KIND_NAMES.items() if kind in allowed]
    assert all(name in message for name in supported)
    # Storage refuses them too, and creates nothing for them in the working directory.
    if not text.startswith("s3://"):
        for call in (storage.read_bytes, storage.list_files, lambda t: storage.write_bytes(f"{t}/a.png", b"x")):
            with pytest.raises(LocationError):
                call(text)
    assert list(tmp_path.iterdir()) == []
