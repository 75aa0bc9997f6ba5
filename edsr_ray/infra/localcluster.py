"""A Ray cluster of several nodes on this machine, each one a ``ray start`` process: for tests, CI and demos of the
multi-node paths (``ray job submit``, Ray Train workers spread over nodes).

:class:`LocalCluster` launches one ``ray start --block`` process per node and owns it. Stopping the cluster sends
SIGTERM to exactly those processes, and each takes its own Ray processes (GCS, raylet, dashboard, agents, workers)
down with it. ``ray stop`` is never used: it stops every Ray instance of the user on the machine, other people's
test clusters included.

Isolation from other Ray instances on the same machine:

* every listener gets a free port: the GCS, the dashboard and the client server of the head, and on every node the
  dashboard agent (HTTP and gRPC), the metrics export port and the runtime-env agent (two nodes on one machine must
  not share these); worker processes take random ports;
* a private temp dir, with one ``--temp-dir`` per node inside it (session folders, logs, sockets, and the head's
  ``ray_current_cluster`` address file, so ``ray.init(address="auto")`` elsewhere on the machine never finds this
  cluster). One per node, as on separate machines: a node's runtime-env agent deletes a job's unpacked working dir
  from its session folder when it is done with it, even while a job on another node sharing the folder runs in it.
  Short, because Unix socket paths inside it must fit in 107 bytes;
* ``RAY_ADDRESS`` is removed from the nodes' environment, usage stats are off.

Authentication: Ray 2.60 turns token authentication on by default. With ``auth="token"`` the nodes run with
``RAY_AUTH_MODE=token`` and the token Ray resolves for this user (``RAY_AUTH_TOKEN``, else the file named by
``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``, created by ``ray get-auth-token --generate`` when there is none),
so job drivers, workers and ``ray job`` commands all find the same token without it being passed around.
:meth:`LocalCluster.env` is what a client process needs in its environment, :meth:`LocalCluster.auth_headers` what
an HTTP client of the Jobs API must send, and :meth:`LocalCluster.connect` makes this process a driver (Ray reads
``RAY_AUTH_MODE`` once, on import, so setting it later has no effect here). ``auth="disabled"`` runs without
authentication.

Addresses: ``ray start`` replaces a loopback ``--node-ip-address`` with the machine's own address, which the nodes
then advertise, and a few of Ray's listeners bind every interface; the dashboard listens on 127.0.0.1 only. Clients
reach everything through 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edsr_ray.errors import EdsrRayError
from edsr_ray.infra.processes import find_command, log_tail
from edsr_ray.infra.ray import QUIET_ENV

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
AUTH_MODES = ("token", "disabled")
READY_LINE = "Ray runtime started"  # what `ray start` prints once the node's processes are up
_HEAD_PORTS = ("gcs", "dashboard", "client_server")
_NODE_PORTS = ("agent_http", "agent_grpc", "metrics_export", "runtime_env_agent")
_START_ATTEMPTS = 3  # a port taken between choosing it and Ray binding it makes the node fail: retry with fresh ones
_POLL_S = 0.2


class LocalClusterError(EdsrRayError):
    """A node of the local cluster did not start, or the cluster did not come up in time."""


@dataclass(frozen=True)
class NodeSpec:
    """Resources of one node: logical CPUs, object store size, custom resources (e.g. ``{"node_b": 1}``), and
    variables added to this node's environment only (e.g. ``{"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "5"}``: the
    node then announces its stop as a preemption that far ahead, as a Kubernetes pod does on deletion)."""

    num_cpus: int = 2
    object_store_mb: int = 200
    resources: Mapping[str, float] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_cpus < 0:
            raise LocalClusterError(f"NodeSpec.num_cpus must be >= 0, got {self.num_cpus}")
        if self.object_store_mb < 80:
            raise LocalClusterError(
                f"NodeSpec.object_store_mb must be >= 80 (Ray's minimum), got {self.object_store_mb}"
            )


@dataclass
class _Node:
    name: str
    spec: NodeSpec
    head: bool
    log_path: Path
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None


def free_ports(count: int, host: str = HOST) -> list[int]:
    """``count`` distinct free TCP ports on ``host`` (all sockets are held until every port is chosen)."""
    held = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            held.append(sock)
        return [s.getsockname()[1] for s in held]
    finally:
        for sock in held:
            sock.close()


def find_ray() -> str:
    """The ``ray`` command of this Python (its venv) first, then the one on ``PATH``."""
    found = find_command("ray")
    if found:
        return found
    raise LocalClusterError(f"the `ray` command was not found next to {sys.executable} or on PATH; pip install ray")


class LocalCluster:
    """Several Ray nodes on this machine (the first one is the head); a context manager.

    ``env`` adds variables to every node's environment (they reach every worker and job driver, like a cluster
    image's environment). ``temp_dir``: the cluster's folder, holding each node's Ray temp dir and ``ray start``
    output (default: a fresh short folder under the system temp folder, removed on :meth:`stop`).
    """

    def __init__(
        self,
        nodes: Sequence[NodeSpec] = (NodeSpec(), NodeSpec()),
        *,
        temp_dir: str | os.PathLike[str] | None = None,
        auth: str = "token",
        env: Mapping[str, str] | None = None,
        ready_timeout_s: float = 120.0,
    ):
        if not nodes:
            raise LocalClusterError("a cluster needs at least one node (the head)")
        if auth not in AUTH_MODES:
            raise LocalClusterError(f"auth must be one of {list(AUTH_MODES)}, got {auth!r}")
        self.specs = tuple(nodes)
        self.auth = auth
        self.extra_env = dict(env or {})
        self.ready_timeout_s = ready_timeout_s
        self._own_temp_dir = temp_dir is None
        self._temp_dir_arg = temp_dir
        self.temp_dir: Path | None = None
        self._nodes: list[_Node] = []
        self._token: str | None = None
        self._finalizer: weakref.finalize | None = None

    # -- addresses and client settings ------------------------------------------------------------------------------

    @property
    def _head(self) -> _Node:
        if not self._nodes or not self._nodes[0].ports:
            raise LocalClusterError("the local cluster has not been started")
        return self._nodes[0]

    @property
    def address(self) -> str:
        """GCS address for ``ray.init(address=...)`` and ``ray start --address``."""
        return f"{HOST}:{self._head.ports['gcs']}"

    @property
    def dashboard_url(self) -> str:
        """Dashboard / Jobs API address for ``ray job submit --address`` and ``JobSubmissionClient``."""
        return f"http://{HOST}:{self._head.ports['dashboard']}"

    @property
    def ports(self) -> list[dict[str, int]]:
        """The ports chosen for each node, head first: ``gcs``, ``dashboard``, ``agent_http``, ``metrics_export``..."""
        return [dict(n.ports) for n in self._nodes]

    @property
    def running(self) -> bool:
        return bool(self._nodes) and all(n.process is not None and n.process.poll() is None for n in self._nodes)

    def env(self) -> dict[str, str]:
        """Variables a client process (``ray job ...``, a driver) needs to use this cluster."""
        return {"RAY_AUTH_MODE": self.auth, **QUIET_ENV, "RAY_API_SERVER_ADDRESS": self.dashboard_url}

    def connect(self, **init_kwargs: Any) -> Any:
        """``ray.init`` this process as a driver of the cluster; returns Ray's context (``ray.shutdown()`` leaves).

        Connects through the address file in the cluster's temp dir (``address="auto"``), the one way in which
        ``ray.init`` turns token authentication on for a process that imported Ray before ``RAY_AUTH_MODE`` was set;
        an explicit address never does. ``RAY_ADDRESS`` in the environment would take precedence, so it must not be
        set.
        """
        import ray

        if os.environ.get("RAY_ADDRESS"):
            raise LocalClusterError(
                f"RAY_ADDRESS={os.environ['RAY_ADDRESS']} is set and would win over this cluster; unset it first"
            )
        return ray.init(address="auto", _temp_dir=str(self._node_dir(self._head)), **init_kwargs)

    def auth_headers(self) -> dict[str, str]:
        """HTTP headers for the dashboard and Jobs API (``JobSubmissionClient(url, headers=...)``)."""
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def job_client(self) -> Any:
        """A ``ray.job_submission.JobSubmissionClient`` for this cluster, authenticated."""
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url, headers=self.auth_headers())

    def nodes(self) -> list[dict[str, Any]]:
        """The cluster's nodes as the state API lists them (``node_id``, ``state``, ``resources_total``, ...)."""
        reply = self._get_json("/api/v0/nodes?limit=1000&detail=true")
        return list(reply["data"]["result"]["result"])

    # -- lifecycle --------------------------------------------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> LocalCluster:
        """Start the head, then the other nodes; return once every node is alive and the Jobs API answers."""
        if self._nodes:
            raise LocalClusterError("this local cluster was already started; create a new LocalCluster")
        ray_cmd = find_ray()
        if self._own_temp_dir:
            self.temp_dir = Path(tempfile.mkdtemp(prefix="ray-"))
        else:
            self.temp_dir = Path(self._temp_dir_arg).expanduser().absolute()  # type: ignore[arg-type]
            self.temp_dir.mkdir(parents=True, exist_ok=True)
        self._finalizer = weakref.finalize(self, _stop_nodes, self._nodes, os.getpid(), 15.0)
        started = time.monotonic()
        try:
            if self.auth == "token":
                self._token = self._resolve_token(ray_cmd)
            for i, spec in enumerate(self.specs):
                node = _Node(f"node{i}", spec, head=i == 0, log_path=self.temp_dir / f"node{i}.log")
                self._nodes.append(node)
                self._start_node(ray_cmd, node, started)
            self._wait_for_cluster(started)
        except BaseException:
            self.stop()
            raise
        log.info(
            "local Ray cluster of %d nodes up in %.1f s: GCS %s, dashboard %s (temp dir %s)",
            len(self._nodes),
            time.monotonic() - started,
            self.address,
            self.dashboard_url,
            self.temp_dir,
        )
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop the nodes this object started (workers first, then the head); idempotent."""
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        started = time.monotonic()
        if any(n.process is not None for n in self._nodes):
            _stop_nodes(self._nodes, os.getpid(), timeout_s)
            log.info("local Ray cluster stopped in %.1f s", time.monotonic() - started)
        if self._own_temp_dir and self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def stop_node(self, index: int, timeout_s: float = 60.0) -> None:
        """Stop one worker node (``index`` >= 1; the head holds the cluster) as an instance shutdown would.

        ``ray start`` answers SIGTERM by draining the node for preemption for ``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S``
        seconds (0 here unless the node's :attr:`NodeSpec.env` sets it), then stopping the node's Ray processes.
        Returns once the node's process has exited; :meth:`start_node` brings it back.
        """
        node = self._worker_node(index)
        if node.process is None:
            raise LocalClusterError(f"ray node {node.name} is not running")
        _stop_nodes([node], os.getpid(), timeout_s)
        log.info("ray node %s stopped", node.name)

    def start_node(self, index: int) -> None:
        """Start a worker node stopped by :meth:`stop_node` again (a new Ray node id, fresh ports, same folder), and
        return once it is alive in the cluster."""
        node = self._worker_node(index)
        if node.process is not None:
            raise LocalClusterError(f"ray node {node.name} is already running")
        started = time.monotonic()
        self._start_node(find_ray(), node, started)
        self._wait_for_cluster(started)

    # -- internals --------------------------------------------------------------------------------------------------

    def _worker_node(self, index: int) -> _Node:
        if not 1 <= index < len(self._nodes):
            raise LocalClusterError(f"node index must be 1..{len(self._nodes) - 1} (0 is the head), got {index}")
        return self._nodes[index]

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        # `python` in a job's entrypoint is this interpreter, as it would be in a cluster image.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.update(
            {
                "RAY_AUTH_MODE": self.auth,
                **QUIET_ENV,
                # A stopped node drains before it exits; nothing here needs the grace period.
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            }
        )
        env.update(self.extra_env)
        return env

    def _resolve_token(self, ray_cmd: str) -> str:
        """The token Ray uses for this user, generated (as ``ray start`` would) when there is none yet."""
        proc = subprocess.run(
            [ray_cmd, "get-auth-token", "--generate"],
            env=self._base_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        token = proc.stdout.strip()
        if proc.returncode != 0 or not token:
            raise LocalClusterError(f"`ray get-auth-token --generate` failed: {proc.stderr.strip()[-500:]}")
        return token

    def _command(self, ray_cmd: str, node: _Node) -> list[str]:
        spec, ports = node.spec, node.ports
        argv = [
            ray_cmd,
            "start",
            "--block",
            f"--node-ip-address={HOST}",
            f"--num-cpus={spec.num_cpus}",
            "--num-gpus=0",
            f"--object-store-memory={spec.object_store_mb * 2**20}",
            f"--temp-dir={self._node_dir(node)}",
            f"--dashboard-agent-listen-port={ports['agent_http']}",
            f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
            f"--metrics-export-port={ports['metrics_export']}",
            f"--runtime-env-agent-port={ports['runtime_env_agent']}",
            "--min-worker-port=0",  # 0: random ports for worker processes
            "--max-worker-port=0",
            "--disable-usage-stats",
            "--log-style=record",
            "--log-color=false",
        ]
        if spec.resources:
            argv.append(f"--resources={json.dumps(dict(spec.resources))}")
        if node.head:
            argv += [
                "--head",
                f"--port={ports['gcs']}",
                "--include-dashboard=true",
                f"--dashboard-host={HOST}",
                f"--dashboard-port={ports['dashboard']}",
                f"--ray-client-server-port={ports['client_server']}",
            ]
        else:
            argv.append(f"--address={self.address}")
        return argv

    def _node_dir(self, node: _Node) -> Path:
        """Ray's temp dir for one node (see the module docstring for why each node has its own)."""
        assert self.temp_dir is not None
        path = self.temp_dir / node.name
        path.mkdir(exist_ok=True)
        return path

    def _start_node(self, ray_cmd: str, node: _Node, started: float) -> None:
        names = (*(_HEAD_PORTS if node.head else ()), *_NODE_PORTS)
        for attempt in range(1, _START_ATTEMPTS + 1):
            node.ports = dict(zip(names, free_ports(len(names))))
            with open(node.log_path, "wb") as out:
                node.process = subprocess.Popen(
                    self._command(ray_cmd, node),
                    env={**self._base_env(), **node.spec.env},
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self.temp_dir,
                    # Its own session: a Ctrl-C in the terminal reaches the test, which stops the cluster in order.
                    start_new_session=True,
                )
            while time.monotonic() - started < self.ready_timeout_s:
                if READY_LINE in node.log_path.read_text(errors="replace"):
                    log.info("ray node %s started (pid %d, ports %s)", node.name, node.process.pid, node.ports)
                    return
                if node.process.poll() is not None:
                    break
                time.sleep(_POLL_S)
            else:
                raise LocalClusterError(
                    f"ray node {node.name} did not start within {self.ready_timeout_s:.0f} s; last lines of "
                    f"{node.log_path}:\n{self._log_tail(node)}"
                )
            if attempt == _START_ATTEMPTS:
                raise LocalClusterError(
                    f"ray node {node.name} exited with status {node.process.returncode} during start-up "
                    f"({attempt} attempts); last lines of {node.log_path}:\n{self._log_tail(node)}"
                )
            log.info("ray node %s exited during start-up (a port taken meanwhile?); retrying", node.name)
            _stop_nodes([node], os.getpid(), 5.0)

    def _wait_for_cluster(self, started: float) -> None:
        """Every node alive in the GCS, and the Jobs API answering (it needs the head's agent too)."""
        last: Exception | str = "no answer yet"
        while time.monotonic() - started < self.ready_timeout_s:
            dead = [n.name for n in self._nodes if n.process is None or n.process.poll() is not None]
            if dead:
                raise LocalClusterError(f"ray node(s) {dead} exited; see the logs in {self.temp_dir}")
            try:
                alive = [n for n in self.nodes() if n.get("state") == "ALIVE"]
                self._get_json("/api/jobs/")
                if len(alive) == len(self._nodes):
                    return
                last = f"{len(alive)} of {len(self._nodes)} nodes alive"
            except (OSError, ValueError, KeyError) as exc:
                last = exc
            time.sleep(_POLL_S)
        raise LocalClusterError(f"the local cluster did not come up within {self.ready_timeout_s:.0f} s: {last}")

    def _get_json(self, path: str) -> Any:
        request = urllib.request.Request(self.dashboard_url + path, headers=self.auth_headers())
        with urllib.request.urlopen(request, timeout=10) as reply:
            return json.loads(reply.read())

    def _log_tail(self, node: _Node, lines: int = 30) -> str:
        return log_tail(node.log_path, lines)


def _stop_nodes(nodes: list[_Node], owner_pid: int, timeout_s: float) -> None:
    """SIGTERM the ``ray start`` processes we launched, workers before the head; SIGKILL what outlives ``timeout_s``.

    Each ``ray start --block`` process answers SIGTERM by stopping the Ray processes of its node.
    """
    if os.getpid() != owner_pid:
        return  # a forked copy of the process that started the cluster: the nodes are not ours to stop
    for node in reversed(nodes):
        proc = node.process
        if proc is None:
            continue
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning(
                    "ray node %s (pid %d) did not stop within %.0f s; killing it", node.name, proc.pid, timeout_s
                )
                proc.kill()
                proc.wait()
        node.process = None
