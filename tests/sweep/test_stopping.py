"""Ctrl-C on a joblib sweep (sweep/stopping.py): the main process waits for the runs in progress to save before it
raises KeyboardInterrupt, which makes joblib kill its workers; a run killed before its checkpoint stayed
"running". The runs here are processes holding their folder's lock, as a training run does."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from norm_experiments import run_record
from norm_experiments.sweep.stopping import GraceOnStop, held_run_folders

HOLD = "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(float(sys.argv[2]))"


def holding(run_dir: Path, seconds: float) -> subprocess.Popen:
    """A process that holds run_dir's lock for `seconds`, as a run saving its checkpoint."""
    run_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir / run_record.LOCK), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_the_main_process_waits_for_the_runs_that_hold_their_folders(tmp_path: Path) -> None:
    saving, done, never = tmp_path / "saving", tmp_path / "done", tmp_path / "never"
    done.mkdir()
    (done / run_record.LOCK).write_text("process 1 on x\n")  # a finished run: its lock file stays, unheld
    proc = holding(saving, 1.5)
    assert held_run_folders({saving, done, never}) == [saving]
    handler = GraceOnStop(lambda: {saving, done, never}, grace_s=30)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        handler(2, None)
    waited = time.monotonic() - started
    proc.wait()
    assert 1.0 < waited < 10, waited  # until the run released its folder, not the whole grace
    assert held_run_folders({saving}) == []
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C: at once
        handler(2, None)


def test_a_run_that_never_lets_go_is_waited_for_only_the_grace(tmp_path: Path) -> None:
    proc = holding(tmp_path / "stuck", 60)
    try:
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            GraceOnStop(lambda: {tmp_path / "stuck"}, grace_s=1.0)(2, None)
        assert 0.9 < time.monotonic() - started < 5
    finally:
        proc.kill()
        proc.wait()
