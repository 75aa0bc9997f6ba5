"""edsr_ray.cli: the exit status of every outcome, what reaches the terminal, and the run log of a command."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edsr_ray import cli
from edsr_ray.errors import ConfigError, EdsrRayError, ImageError, Interrupted, StorageError

ROOT = Path(__file__).parents[1]


def _raises(exc: BaseException):
    def work() -> int:
        raise exc

    return work


@pytest.mark.parametrize(
    ("work", "status", "line"),
    [
        (lambda: 0, cli.DONE, None),
        (lambda: 1, cli.ITEMS_FAILED, None),
        (
            _raises(ConfigError("cfg.yaml: train.lr: must be > 0")),
            cli.BAD_INPUT,
            "error: cfg.yaml: train.lr: must be > 0",
        ),
        (_raises(ImageError("a.png: corrupt")), cli.BAD_INPUT, "error: a.png: corrupt"),
        (_raises(StorageError("s3://b/k: access refused")), cli.BAD_INPUT, "error: s3://b/k: access refused"),
        (_raises(Interrupted("the run stopped after 3 of 9 images")), cli.INTERRUPTED, "error: the run stopped after"),
        (_raises(KeyboardInterrupt()), cli.INTERRUPTED, "error: interrupted; outputs written so far are complete"),
    ],
)
def test_every_outcome_has_its_status_and_one_error_line(work, status, line, capsys):
    assert cli.run(work) == status
    err = capsys.readouterr().err
    if line is None:
        assert err == ""
    else:
        assert err.startswith(line) and err.count("\n") == 1, err


def test_a_bug_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        cli.run(lambda: 1 // 0)
    assert issubclass(Interrupted, EdsrRayError)  # an interruption is still a user-facing error, with its own status


@pytest.mark.parametrize(
    ("name", "level", "shown"),
    [
        ("edsr_ray.batch.job", logging.INFO, True),
        ("__main__", logging.INFO, True),
        ("botocore.credentials", logging.INFO, False),
        ("mlflow.store.db.utils", logging.INFO, False),
        ("urllib3", logging.WARNING, True),
        ("ray.data._internal.progress", logging.WARNING, False),
        ("ray", logging.INFO, False),
        ("ray.train", logging.ERROR, True),
        ("raylet_like_but_not_ray", logging.WARNING, True),
    ],
)
def test_the_terminal_shows_the_commands_messages_and_others_problems(name, level, shown):
    record = logging.LogRecord(name, level, __file__, 1, "message", None, None)
    assert cli.TerminalFilter().filter(record) is shown


def test_a_command_run_as_a_program_keeps_other_messages_in_its_run_log(tmp_path):
    """Native writes on standard error (Ray's core worker logs its errors there) and other libraries' messages go to
    the run log in the project home; the terminal shows the command's own lines, its warnings and its error."""
    script = tmp_path / "command.py"
    script.write_text(
        textwrap.dedent(
            """
            import logging, os, sys
            from edsr_ray import cli
            from edsr_ray.errors import ConfigError

            def main():
                cli.setup_logging()
                def work():
                    logging.getLogger("edsr_ray.demo").info("own progress")
                    logging.getLogger("ray.data").warning("Progress bars disabled")
                    logging.getLogger("botocore").info("Found credentials")
                    logging.getLogger("urllib3").warning("a real warning")
                    os.write(2, b"[E core_worker.cc] native chatter\\n")
                    print("summary line")
                    raise ConfigError("--model x.pt: no such file")
                return cli.run(work)

            cli.entry(main, "demo")
            """
        )
    )
    env = {**os.environ, "EDSR_RAY_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == cli.BAD_INPUT
    assert proc.stdout == "summary line\n"
    assert "own progress" in proc.stderr and "a real warning" in proc.stderr
    assert proc.stderr.rstrip().endswith("error: --model x.pt: no such file")
    for chatter in ("Progress bars disabled", "Found credentials", "native chatter"):
        assert chatter not in proc.stderr
    (log,) = (tmp_path / "home" / "logs").glob("demo-*.log")
    text = log.read_text()
    for line in ("own progress", "Progress bars disabled", "Found credentials", "native chatter"):
        assert line in text
