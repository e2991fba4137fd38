"""Put a report's files in place all at once: written into a staging folder inside the output folder, then
renamed into place while holding an exclusive lock on the output folder.

Two reports written into one folder at the same time therefore never mix files (the second waits for the
first to finish its renames), and a write that fails (a full disk) leaves the previous report as it was:
nothing is renamed until every file is complete, and the staging folder is removed.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STAGING_PREFIX = ".report-staging-"
# In a folder the report writes into: the names of the files norm-exp-report put there, so that a later report
# replaces only those (a user's own results.csv in an --out folder is refused, not replaced).
MANIFEST = ".norm-exp-report.json"


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


def publish(moves: list[tuple[Path, Path]], lock_dir: Path, stale: tuple[str, ...] = ()) -> None:
    """Rename every (staged, final) pair in order under the lock; put the document last, since it links the
    others. Then remove `stale`: files an earlier report wrote into lock_dir that this one no longer makes
    (a plot of a reference no longer asked for), which would sit there looking current. Files get the
    permissions a new file gets from the umask (mkstemp-like folders are 0700)."""
    mode = 0o666 & ~_umask()
    with locked(lock_dir):
        for staged, final in moves:
            os.chmod(staged, mode)
            os.replace(staged, final)
        for name in stale:
            path = lock_dir / name
            if path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def written_before(out_dir: Path) -> set[str]:
    """The file names out_dir's manifest lists (none when it is missing or not a list of names)."""
    from norm_experiments import safe_io

    try:
        names = safe_io.load_json(out_dir / MANIFEST, max_bytes=2**20)
    except (OSError, UnicodeDecodeError, ValueError):
        return set()
    return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()


def stale_files(out_dir: Path, names: list[str]) -> tuple[str, ...]:
    """The files out_dir's manifest lists that a report writing `names` no longer makes (plain names only)."""
    return tuple(
        sorted(n for n in written_before(out_dir) - set(names) if n == Path(n).name and n != MANIFEST)
    )


def stage_manifest(stage: Path, out_dir: Path, names: list[str]) -> Path:
    """The manifest of out_dir after this report: the names it wrote (earlier ones are removed), staged."""
    path = stage / MANIFEST
    path.write_text(json.dumps(sorted(set(names)), indent=1), encoding="utf-8")
    return path
