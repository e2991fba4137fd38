"""Full disks, for real: a small tmpfs filled to the last byte (mounting one needs root; without it these
tests skip), and /dev/full, which fails every write with ENOSPC, where a single file must be unwritable.
Every failure is one line naming the file and the errno, exit status 2, and no record says `running`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from norm_experiments import run_record
from norm_experiments.run_names import run_identity
from norm_experiments.training.record import settle_record
from norm_experiments.training.run_folder import locked
from tests.helpers import SMOKE, assert_clean_failure, compose_config, fill, run_cli

# Subprocess runs of the real CLI or trainings: the full suite runs them, `pytest -m "not slow"` does not.
pytestmark = pytest.mark.slow


def test_a_full_disk_refuses_a_run_and_a_sweep_before_hydra_writes(tmpfs, tmp_path: Path) -> None:
    disk = tmpfs(256)
    fill(disk)
    run = run_cli([*SMOKE, f"hydra.run.dir={disk}/run"], cwd=tmp_path, timeout=120)
    assert_clean_failure(run, f"hydra.run.dir={disk}/run: {disk}: the disk is full (ENOSPC")
    sweep = run_cli(["-m", *SMOKE, "seed=0,1", f"hydra.sweep.dir={disk}/sweep"], cwd=tmp_path, timeout=120)
    assert_clean_failure(sweep, f"hydra.sweep.dir={disk}/sweep: {disk}: the disk is full (ENOSPC")
    for result in (run, sweep):
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # no multirun.yaml, no .hydra/


def test_a_sweep_that_fills_the_disk_records_each_run_as_failed(tmpfs, tmp_path: Path) -> None:
    disk = tmpfs(1100)  # room for the configs and a record, not for a checkpoint
    result = run_cli(["-m", *SMOKE, "seed=0,1", f"hydra.sweep.dir={disk}/sweep"], cwd=tmp_path, timeout=300)
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "Logging error" not in output, output[-3000:]
    records = [json.loads(p.read_text()) for p in sorted(disk.rglob(run_record.FILENAME))]
    assert len(records) == 2, output[-3000:]
    for record in records:
        assert record["status"] == "failed", record
        assert "ENOSPC: No space left on device" in record["error"] and str(disk) in record["error"]


def test_hydra_folder_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    """/dev/full mounted over .hydra/config.yaml: the kernel's own ENOSPC (a symbolic link to /dev/full is
    refused as a link before anything is written: tests/hostile/test_links.py)."""
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    target = run_dir / ".hydra" / "config.yaml"
    target.touch()
    mounted = subprocess.run(["mount", "--bind", "/dev/full", str(target)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"/dev/full over a file needs a bind mount; it failed here: {mounted.stderr.strip()}")
    try:
        result = run_cli([*SMOKE, f"hydra.run.dir={run_dir}"], cwd=tmp_path, timeout=120)
    finally:
        subprocess.run(["umount", str(target)], check=False)
    assert_clean_failure(
        result, f"error: could not write {run_dir}/.hydra/config.yaml: ENOSPC: No space left on device"
    )
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    record = run_record.read(run_dir)
    assert record is None or record["status"] == "failed", record


def test_a_running_record_becomes_failed_on_a_full_disk(tmpfs) -> None:
    disk = tmpfs(256)
    run_dir = disk / "run"
    cfg = compose_config(SMOKE)
    run_record.write(run_dir, {"status": "running", "run_id": run_identity(cfg), "norm": "batch"})
    fill(disk)
    with locked(run_dir):  # the lock works on a full disk (its holder line is dropped)
        pass
    other = compose_config([*SMOKE, "seed=7"])
    settle_record(other, run_dir)  # another config's record: left alone
    assert run_record.read(run_dir)["status"] == "running"
    settle_record(cfg, run_dir)
    assert run_record.read(run_dir) == {"status": "failed", "run_id": run_identity(cfg), "norm": "batch"}
