"""Put a report's files in place all at once: written into a staging folder inside the output folder, then
renamed into place while holding an exclusive lock on the output folder.

Two reports written into one folder at the same time therefore never mix files (the second waits for the
first to finish its renames), and a write that fails (a full disk) leaves the previous report as it was:
nothing is renamed until every file is complete, and the staging folder is removed.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STAGING_PREFIX = ".report-staging-"


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive flock on the folder itself (no lock file is left behind)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextmanager
def staging(out_dir: Path) -> Iterator[Path]:
    """A fresh folder inside out_dir (same filesystem: renames out of it are atomic); removed afterwards."""
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=out_dir, prefix=STAGING_PREFIX))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def publish(moves: list[tuple[Path, Path]], lock_dir: Path) -> None:
    """Rename every (staged, final) pair in order under the lock; put the document last, since it links the
    others. Files get the permissions a new file gets from the umask (mkstemp-like folders are 0700)."""
    mode = 0o666 & ~_umask()
    with locked(lock_dir):
        for staged, final in moves:
            os.chmod(staged, mode)
            os.replace(staged, final)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
