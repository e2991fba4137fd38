"""Ctrl-C (or SIGTERM) on a sweep whose runs are worker processes (the joblib launcher): the runs save first.

The signal reaches the sweep's main process and its workers at once (one process group). Each worker's run stops
after its step and saves a checkpoint (training/signals.py), but the main process's KeyboardInterrupt makes joblib
kill its workers at once: on a busy machine a run was killed before its checkpoint was written, and its record
stayed "running". So the main process waits, before it raises KeyboardInterrupt, until no run folder this sweep
started is locked any more (a run holds its folder's lock until its checkpoint and record are written), at most
STOP_GRACE_S seconds. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
import time
from pathlib import Path

from norm_experiments import run_record

STOP_GRACE_S = 120.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def held_run_folders(run_dirs: set[Path]) -> list[Path]:
    """The run folders whose lock a process holds now (a run still training or saving)."""
    held = []
    for run_dir in sorted(run_dirs):
        try:
            fd = os.open(run_dir / run_record.LOCK, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # no lock file: the run never started
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            held.append(run_dir)
        finally:
            os.close(fd)  # closing releases the shared lock if it was taken
    return held


class GraceOnStop:
    """The main process's handler of SIGINT/SIGTERM during a worker sweep (see the module doc)."""

    def __init__(self, run_dirs, grace_s: float = STOP_GRACE_S) -> None:  # noqa: ANN001 - a callable giving a set
        self.run_dirs = run_dirs  # () -> the run folders the sweep started so far
        self.grace_s = grace_s
        self.stopping = False
        self.previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def __call__(self, signum: int, frame: object) -> None:
        if self.stopping:  # asked twice: stop now
            raise KeyboardInterrupt
        self.stopping = True
        deadline = time.monotonic() + self.grace_s
        held = held_run_folders(self.run_dirs())
        if held:
            print(
                f"[sweep] stopping: waiting up to {self.grace_s:.0f} s for {len(held)} run(s) to save their "
                "checkpoints (Ctrl-C again stops at once)",
                file=sys.stderr,
                flush=True,
            )
        while held and time.monotonic() < deadline:
            time.sleep(0.2)
            held = held_run_folders(self.run_dirs())
        raise KeyboardInterrupt
