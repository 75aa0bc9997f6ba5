"""The one helper every command in ``jobs/`` uses: its logging, and the exit status of every outcome.

A command's ``main(argv)`` parses its arguments, calls :func:`setup_logging` and returns :func:`run` of its work: the
work's own status, or the status of the error that stopped it, printed as one ``error:`` line instead of a traceback.
Run as a program (``if __name__ == "__main__": entry(main, "name")``), a command also gets a run log in the project
home (:func:`edsr_ray.home.logs_dir`) that keeps every log message from INFO up, and whatever native code writes to the
process's standard error (Ray's core worker logs its errors there). The terminal shows the command's own messages, its
progress bars and its summary, other libraries' warnings and Ray's errors (:class:`TerminalFilter`): the rest of what
Ray and the other libraries say is in the run log.

The exit status, the same in every command (the README's "Exit status" table is its documentation):
:data:`DONE`, :data:`ITEMS_FAILED`, :data:`BAD_INPUT`, :data:`INTERRUPTED`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from edsr_ray import home
from edsr_ray.errors import EdsrRayError, Interrupted

DONE = 0  # everything asked for was done
ITEMS_FAILED = 1  # the run finished, but some items failed (each reported with its reason)
BAD_INPUT = 2  # bad usage or input: arguments, config, locations, models or data (one "error:" line says which)
INTERRUPTED = 3  # a cluster or storage failure, or Ctrl-C, stopped the run part-way; the same command finishes it

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers whose messages are the command's own: shown at the command's level. Others need WARNING to reach the
# terminal, and Ray's ERROR (its warnings are about its own internals, e.g. progress bars it was told to hide).
PROJECT_LOGGERS = ("edsr_ray", "__main__")
_CONSOLE, _RUN_LOG = "edsr-ray-console", "edsr-ray-run-log"


def _is_project(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in PROJECT_LOGGERS)


def _is_ray(name: str) -> bool:
    return name == "ray" or name.startswith("ray.")


class TerminalFilter(logging.Filter):
    """Lets through the command's own messages, other libraries' warnings and errors, and Ray's errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _is_project(record.name):
            return True
        return record.levelno >= (logging.ERROR if _is_ray(record.name) else logging.WARNING)


def setup_logging(*, quiet: bool = False) -> None:
    """Log to the terminal (standard error): the command's own messages from INFO (WARNING with ``quiet``), other
    libraries' as :class:`TerminalFilter` says. Like ``logging.basicConfig``, nothing is added when the process has
    configured logging already (a test runner's capture); calling it again replaces its own handler."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _CONSOLE:
            root.removeHandler(handler)
    if any(h.get_name() != _RUN_LOG for h in root.handlers):
        return
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.set_name(_CONSOLE)
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    console.setFormatter(logging.Formatter(LOG_FORMAT))
    console.addFilter(TerminalFilter())
    root.addHandler(console)


def error(message: object) -> None:
    """The one line a command prints when it stops on an error."""
    print(f"error: {message}", file=sys.stderr, flush=True)


def run(work: Callable[[], int]) -> int:
    """``work()``'s exit status, or the status of the error that stopped it (after one ``error:`` line).

    :class:`~edsr_ray.errors.Interrupted` and Ctrl-C give :data:`INTERRUPTED`, every other
    :class:`~edsr_ray.errors.EdsrRayError` :data:`BAD_INPUT`. Anything else is a bug and keeps its traceback.
    """
    try:
        return work()
    except Interrupted as exc:
        error(exc)
        return INTERRUPTED
    except EdsrRayError as exc:
        error(exc)
        return BAD_INPUT
    except KeyboardInterrupt:
        error("interrupted; outputs written so far are complete, and running the same command again finishes it")
        return INTERRUPTED


def open_run_log(name: str) -> Path:
    """Start this process's run log ``<project home>/logs/<name>-<time>-<pid>.log`` and send to it every log record
    (the terminal filters them) and everything written to file descriptor 2 by native code; Python's own
    ``sys.stderr`` (tracebacks, warnings, progress bars, ``error:`` lines) stays on the terminal."""
    folder = home.logs_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stderr.flush()
    terminal = os.dup(2)
    os.dup2(fd, 2)  # native writes (and child processes that inherit it) go to the run log
    os.close(fd)
    sys.stderr = os.fdopen(terminal, "w", buffering=1, encoding="utf-8", errors="backslashreplace")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.set_name(_RUN_LOG)
    file_handler.setLevel(logging.INFO)  # libraries that log DEBUG keep those in their own files (Ray Data does)
    file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(file_handler)
    return path


def entry(main: Callable[[], int], name: str) -> NoReturn:
    """Run a command as a program: its run log (:func:`open_run_log`), then ``main()``, whose status ends it."""
    open_run_log(name)
    sys.exit(main())
