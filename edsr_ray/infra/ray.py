"""Connecting a command to Ray, quietly: the job's cluster when there is one, else a private local instance that every
process it starts can find, with Ray's own messages kept in Ray's log files.

* :func:`ensure_ray` joins ``RAY_ADDRESS`` (set by ``ray job submit``) or starts a local instance. A local instance
  gets its GCS port chosen here and its address put into ``RAY_ADDRESS`` before it starts, so the processes it
  starts inherit it: Ray's own helpers that look for "the" cluster (Train's placement-group cleaner polls the state
  API) find this one even when other Ray instances run on the machine, instead of failing on "Found multiple active
  Ray instances".
* Worker output is not forwarded to the driver (``log_to_driver=False``): Ray's internal actors (Train's controller,
  Data's split coordinator) log to their own files, where Ray keeps them. What the project's workers have to say
  travels through :class:`LogRelay` instead (training progress from rank 0).
* In the driver, Ray's Python loggers (``ray``, ``ray.data``) hand their records to this process's logging instead
  of writing to the terminal themselves: a command's logging (:mod:`edsr_ray.cli`) shows their errors and keeps the
  rest in its run log; Ray Data also keeps writing its own ``ray-data.log`` in the session folder.
* :data:`QUIET_ENV`: the telemetry switches every process the project starts must have.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

# Settings every process the project starts must have: nothing calls outside the machine.
QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
ADDRESS_ENV = "RAY_ADDRESS"
# Ray reads the GCS port of a new head node from this variable (ray._private.node, Ray 2.60).
GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"
# Ray's driver-side loggers that write to the terminal on their own; their records are sent to the root logger.
RAY_DRIVER_LOGGERS = ("ray", "ray.data")
# The address this process gave RAY_ADDRESS for the local instance it started (stale once that instance is gone).
_started: dict[str, str] = {}


def quiet_environment() -> None:
    """Put the telemetry switches of :data:`QUIET_ENV` into this process's environment (values already set stay), so
    that it and every process it starts keep their usage data on the machine."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def ensure_ray(
    *,
    include_dashboard: bool = False,
    num_cpus: int | None = None,
    object_store_memory: int | None = None,
) -> None:
    """Use the current Ray connection, else the cluster named by ``RAY_ADDRESS`` (set by ``ray job submit``; ``auto``
    joins the cluster started on this machine with ``ray start``), else start a private local Ray.

    A cluster that merely runs on this machine is not joined unasked: it may be someone else's. The telemetry
    settings reach the workers through the runtime env, except those the job's own runtime env already sets (Ray
    refuses to merge two runtime envs that name the same variable, even with the same value). ``num_cpus`` and
    ``object_store_memory`` size a local instance (default: the machine's). ``include_dashboard``: the dashboard also
    serves the state API, which Ray Train's placement-group cleaner polls.
    """
    import ray

    if ray.is_initialized():
        return
    missing = {k: v for k, v in QUIET_ENV.items() if k not in os.environ}
    quiet_environment()
    runtime_env = {"env_vars": missing} if missing else None
    route_driver_logs()  # before init: it already has things to say
    address = os.environ.get(ADDRESS_ENV)
    if address and address != _started.get(ADDRESS_ENV):
        ray.init(runtime_env=runtime_env, log_to_driver=False)
    else:
        _start_local(ray, runtime_env, include_dashboard, num_cpus, object_store_memory)


def stop_ray() -> None:
    """Disconnect from Ray (a local instance started by :func:`ensure_ray` stops with it) and take its address out of
    the environment again."""
    import ray

    ray.shutdown()
    if os.environ.get(ADDRESS_ENV) == _started.pop(ADDRESS_ENV, None):
        os.environ.pop(ADDRESS_ENV, None)


def _start_local(ray: Any, runtime_env: Any, include_dashboard: bool, num_cpus: Any, object_store_memory: Any) -> None:
    """A new local instance whose address is in ``RAY_ADDRESS`` of every process it starts (and of this one)."""
    port = _free_port()  # a port taken between here and the GCS binding it fails the start: tried once more
    for attempt in (1, 2):
        address = f"{ray.util.get_node_ip_address()}:{port}"
        os.environ[GCS_PORT_ENV], os.environ[ADDRESS_ENV] = str(port), address
        try:
            ray.init(
                address="local",
                include_dashboard=include_dashboard,
                log_to_driver=False,
                runtime_env=runtime_env,
                num_cpus=num_cpus,
                object_store_memory=object_store_memory,
            )
        except Exception:
            os.environ.pop(ADDRESS_ENV, None)
            ray.shutdown()
            if attempt == 2:
                raise
            port = _free_port()
            continue
        finally:
            os.environ.pop(GCS_PORT_ENV, None)
        _started[ADDRESS_ENV] = ray.get_runtime_context().gcs_address
        os.environ[ADDRESS_ENV] = _started[ADDRESS_ENV]
        return


def route_driver_logs() -> None:
    """Send the records of Ray's driver-side loggers to this process's logging instead of Ray's own terminal handlers
    (Ray Data's file handler stays). What reaches the terminal is then the application's choice (:mod:`edsr_ray.cli`:
    Ray's errors)."""
    import ray.data  # noqa: F401  (configures the ray.data logger, which must exist before it is re-routed)

    to_process_logging(*RAY_DRIVER_LOGGERS)


def to_process_logging(*names: str) -> None:
    """Take the terminal handlers off the loggers ``names`` of a library that prints on its own (Ray, MLflow), keeping
    its file handlers, and let their records reach this process's root logger, whose handlers decide."""
    for name in names:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        logger.propagate = True


# --------------------------------------------------------------------------------------------------------------------
# The project's own messages from Ray workers


class _Mailbox:
    """A Ray actor that holds log lines posted by workers until the driver takes them."""

    def __init__(self) -> None:
        self._items: list[dict[str, Any]] = []

    def post(self, item: dict[str, Any]) -> None:
        self._items.append(item)

    def take(self) -> list[dict[str, Any]]:
        items, self._items = self._items, []
        return items


class _Forward(logging.Handler):
    """A worker-side handler that posts each record of the project's loggers to the driver's mailbox."""

    def __init__(self, mailbox: Any, source: str) -> None:
        super().__init__(logging.INFO)
        self._mailbox, self._source = mailbox, source

    def emit(self, record: logging.LogRecord) -> None:
        try:
            item = {
                "name": record.name,
                "levelno": record.levelno,
                "levelname": record.levelname,
                "msg": f"({self._source}) {record.getMessage()}",
                "created": record.created,  # the worker's clock: when it happened there
                "msecs": record.msecs,
            }
            self._mailbox.post.remote(item)  # fire and forget: a worker never waits for the driver
        except Exception:
            self.handleError(record)


# How long a relay keeps draining on exit for records still on their way from the workers.
EXIT_SETTLE_S = 2.0
EXIT_QUIET_DRAINS = 5  # empty drains 0.1 s apart that end the wait sooner


class LogRelay:
    """Carries the log records of the project's own loggers (``edsr_ray.*``) from Ray workers to the driver's logging.

    Used on the driver as a context manager: :attr:`mailbox` goes to the workers, which call :func:`forward_logs`
    with it; a driver thread re-emits what they post every ``interval_s`` seconds, and once more on exit.
    """

    def __init__(self, interval_s: float = 0.5) -> None:
        import ray

        self.mailbox = ray.remote(num_cpus=0)(_Mailbox).remote()
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edsr-log-relay", daemon=True)

    def __enter__(self) -> LogRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        # A worker posts without waiting, so its last records can reach the mailbox just after its work returned to
        # this driver: drain until the mailbox has stayed empty for a moment (bounded by EXIT_SETTLE_S).
        deadline, quiet = time.monotonic() + EXIT_SETTLE_S, 0
        while quiet < EXIT_QUIET_DRAINS and time.monotonic() < deadline:
            quiet = 0 if self._drain() else quiet + 1
            time.sleep(0.1)
        import ray

        ray.kill(self.mailbox)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._drain()

    def _drain(self) -> int:
        """Re-emit what the workers posted; returns how many records there were."""
        import ray

        try:
            items = ray.get(self.mailbox.take.remote(), timeout=30)
        except Exception as exc:  # the cluster is going away: the run itself reports that
            log.debug("log relay: %s", exc)
            return 0
        for item in items:
            logging.getLogger(item["name"]).handle(logging.makeLogRecord(item))
        return len(items)


def forward_logs(mailbox: Any, source: str) -> None:
    """In a Ray worker: post the records of the project's loggers (INFO and above) to a :class:`LogRelay` mailbox,
    labelled with ``source`` (e.g. "rank 0"). Ray's own messages stay in the worker's log files."""
    logger = logging.getLogger("edsr_ray")
    for handler in list(logger.handlers):
        if isinstance(handler, _Forward):
            logger.removeHandler(handler)
    logger.addHandler(_Forward(mailbox, source))
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)


@contextmanager
def relayed_logs() -> Iterator[Any]:
    """``with relayed_logs() as mailbox:`` a :class:`LogRelay` for the workers of one run (Ray must be connected)."""
    with LogRelay() as relay:
        yield relay.mailbox
