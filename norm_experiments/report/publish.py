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
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from norm_experiments import run_record

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


def publish(moves: list[tuple[Path, Path]], lock_dir: Path, written: list[str] | None = None) -> None:
    """Rename every (staged, final) pair in order under the lock; put the document last, since it links the
    others. With `written` (the names this report puts into lock_dir), under the same lock: the manifest is
    replaced by those names, and the plots an earlier report listed that this one no longer makes (a difference
    plot of a reference no longer asked for) are removed: they would sit there looking current. Files get the
    permissions a new file gets from the umask (mkstemp-like folders are 0700)."""
    mode = 0o666 & ~run_record.current_umask()
    with locked(lock_dir):
        stale = stale_plots(lock_dir, written) if written is not None else ()
        for staged, final in moves:
            os.chmod(staged, mode)
            os.replace(staged, final)
        if written is not None:
            manifest = lock_dir / f".{MANIFEST}.tmp"
            manifest.write_text(json.dumps(sorted(set(written)), indent=1), encoding="utf-8")
            os.chmod(manifest, mode)
            os.replace(manifest, lock_dir / MANIFEST)
        for name in stale:
            path = lock_dir / name
            if path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)


def written_before(out_dir: Path) -> set[str]:
    """The file names out_dir's manifest lists (none when it is missing or not a list of names)."""
    from norm_experiments import safe_io

    try:
        names = safe_io.load_json(out_dir / MANIFEST, max_bytes=2**20)
    except (OSError, UnicodeDecodeError, ValueError):
        return set()
    return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()


# The plots a report may make (report/__init__.py); only these are ever removed as stale: the manifest lies in a
# folder that may be someone else's, and may name any file.
PLOTS = re.compile(r"(dice_vs_batch_size|bn_eval_gap|learning_curves|difference_to_[A-Za-z0-9_.-]+)\.png")


def stale_plots(out_dir: Path, names: list[str]) -> tuple[str, ...]:
    """The plots out_dir's manifest lists that a report writing `names` no longer makes."""
    return tuple(sorted(n for n in written_before(out_dir) - set(names) if PLOTS.fullmatch(n)))
