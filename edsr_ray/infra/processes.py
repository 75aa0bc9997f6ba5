"""Small helpers for the server processes the project starts (SeaweedFS, local Ray nodes)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def find_command(name: str) -> str | None:
    """Path of the executable ``name``: next to this Python first (its venv's ``bin``, where pip put it), then on
    ``PATH``; None when neither has it."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def log_tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a process's log file, for an error message."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.strip().splitlines()[-lines:]) or "(empty log)"
