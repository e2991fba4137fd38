"""Hidden work folders beside a target (a fetched task, a generated dataset), and the removal of those whose
process is gone.

A process that writes a dataset does so in a work folder beside where the dataset goes, named
.NAME.tmp-HOST-PID-RANDOM, and renames it into place at the end; on any failure it removes the folder
itself. A process killed outright (kill -9, the machine's OOM killer, a power cut) cannot: the next one
that writes beside it removes every work folder of the same NAME whose process is no longer running on this
host. Folders of other hosts (a cache on a shared disk) are left to them; so are those of a running
process.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

# Work folders named by an earlier version (.NAME.tmp-RANDOM, no host or process) this old are abandoned.
LEGACY_AGE_S = 24 * 3600


def _marker() -> str:
    return f".tmp-{socket.gethostname()}-"


def make_work_folder(parent: Path, name: str, *, any_name: bool = False) -> Path:
    """A new, empty work folder for a dataset called `name` in `parent` (created if needed), after removing
    the abandoned ones of `name`, or of any name with any_name (a cache folder, where every such folder is
    ours: a generator killed with one configuration leaves its folder however the next one is configured)."""
    parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(parent, None if any_name else name)
    return Path(tempfile.mkdtemp(prefix=f".{name}{_marker()}{os.getpid()}-", dir=parent))


def remove_abandoned(parent: Path, name: str | None) -> list[Path]:
    """Remove the work folders in `parent` (for `name`, or any name) whose process is gone; those removed."""
    removed = []
    stem = "*" if name is None else glob.escape(name)
    for folder in parent.glob(f".{stem}{glob.escape(_marker())}*"):
        pid = folder.name.rsplit(_marker(), 1)[1].split("-", 1)[0]
        if folder.is_dir() and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    for folder in parent.glob(f".{stem}.tmp-*"):
        rest = folder.name.rsplit(".tmp-", 1)[1]
        if "-" not in rest and folder.is_dir() and _age(folder) > LEGACY_AGE_S:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
