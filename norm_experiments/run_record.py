"""The run record, `metrics.json`: the contract between training (which writes it), and the report, the sweep
callback and the tests (which read it). One module owns its file name, its statuses and how it is read and
written, so that no other module spells them. Torch-free: the report and the sweep callback import it.

A record is a JSON object. Every record has `status` and the run's coordinates (`norm`, `batch_size`, `seed`);
a completed run adds its results (`val_dice`, `val_hd95`, `eval_modes`, ...; README.md lists them all).
"""

from __future__ import annotations

import json
import os
import tempfile
from enum import Enum
from pathlib import Path
from typing import Any

from norm_experiments import safe_io

FILENAME = "metrics.json"


class Status(str, Enum):
    """What a run's record says about it. A str: records store the plain value ("completed")."""

    RUNNING = "running"  # training (or killed while training: a later run of the same command resumes it)
    COMPLETED = "completed"  # finished; the same command again skips it
    FAILED = "failed"  # a mistake in the config or the data, or a crash; the same command retries it
    DIVERGED = "diverged"  # the loss became NaN or infinite
    INTERRUPTED = "interrupted"  # SIGTERM/SIGINT: a checkpoint was saved; the same command continues it


# Statuses that mean "this run ended without a usable result".
NO_RESULT = frozenset({Status.FAILED.value, Status.DIVERGED.value})

# Fields without which a record cannot be placed in a table (an early failure records only these).
COORDINATES = ("status", "norm", "batch_size", "seed")


def path_in(run_dir: Path) -> Path:
    return Path(run_dir) / FILENAME


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename over `path`: a reader never sees
    half a file, and a crash or a full disk keeps the previous one. The file gets the permissions the umask
    gives a new file (not mkstemp's 0600), so teammates on a shared filesystem can read results."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write(run_dir: Path, record: dict[str, Any]) -> None:
    """Write a run's record atomically (statuses as plain strings)."""
    text = json.dumps(record, indent=2, default=lambda v: v.value if isinstance(v, Enum) else str(v))
    write_atomic(path_in(run_dir), (text + "\n").encode())


def read(run_dir: Path) -> dict[str, Any] | None:
    """The record in run_dir, or None when it is missing, unreadable or not a JSON object."""
    try:
        record = safe_io.load_json(path_in(run_dir))  # bounded: no FIFO, no /dev/zero, no deep nesting
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def status_of(record: dict[str, Any] | None) -> str | None:
    return None if record is None else record.get("status")
