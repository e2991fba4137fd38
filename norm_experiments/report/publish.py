"""Put a report's files in place: written into a staging folder inside the output folder, then renamed into
place while holding an exclusive lock on the output folder.

Two reports written into one folder at the same time therefore never mix files (the second waits for the
first to finish its renames), and a write that fails (a full disk) leaves the previous report as it was:
nothing is renamed until every file is complete, and the staging folder is removed. The renames are one per
file, so a process killed among them would leave files of two reports: the old documents (report.md, report.html)
are removed first and the new ones renamed last, so such a folder has no document until the report is run again.
A staging folder a killed report left behind is removed by the next report into that folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
import time
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
    """A fresh folder inside out_dir (same filesystem: renames out of it are atomic); removed afterwards. It is
    flock'ed while in use, so that another report can tell a killed report's leftover from a live one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=out_dir, prefix=STAGING_PREFIX))
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        remove_abandoned_staging(out_dir, keep=folder)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        os.close(fd)


ABANDONED_AFTER_S = (
    60  # a staging folder this old and unlocked is a killed report's (a new one locks it at once)
)


def remove_abandoned_staging(out_dir: Path, keep: Path) -> None:
    """Remove the staging folders of killed reports: unlocked (their process is gone) and older than a minute
    (not one a report has just made and not yet locked)."""
    try:
        entries = [e for e in os.scandir(out_dir) if e.name.startswith(STAGING_PREFIX)]
    except OSError:
        return
    for entry in entries:
        if entry.path == str(keep) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            if time.time() - entry.stat(follow_symlinks=False).st_mtime < ABANDONED_AFTER_S:
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live report's
        else:
            shutil.rmtree(entry.path, ignore_errors=True)
        finally:
            os.close(fd)


def publish(
    moves: list[tuple[Path, Path]], lock_dir: Path, written: list[str] | None = None, documents: int = 1
) -> None:
    """Rename every (staged, final) pair in order under the lock. The last `documents` moves are the documents
    (they link the others): their old files are removed before anything is renamed and they are renamed last
    (module doc). With `written` (the names this report puts into lock_dir), under the same lock: the manifest is
    replaced by those names, and the plots an earlier report listed that this one no longer makes (a difference
    plot of a reference no longer asked for) are removed: they would sit there looking current. Files get the
    permissions a new file gets from the umask (mkstemp-like folders are 0700)."""
    mode = 0o666 & ~run_record.current_umask()
    with locked(lock_dir):
        stale = stale_plots(lock_dir, written) if written is not None else ()
        for _, final in moves[len(moves) - documents :]:
            if final.is_file() and not final.is_symlink():
                final.unlink(missing_ok=True)
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
