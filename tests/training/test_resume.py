"""A run killed with SIGKILL and run again continues from its checkpoint and ends with the same metrics
as an uninterrupted run; the same seed and config give identical metrics (CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from norm_experiments import run_record
from tests.helpers import metrics_of, run_cli

# Subprocess runs of the real CLI or trainings: the full suite runs them, `pytest -m "not slow"` does not.
pytestmark = pytest.mark.slow

# 32 steps at batch size 1, a checkpoint every 8: long enough to be killed in the middle.
ARGS = [
    "experiment=smoke",
    "data.batch_size=1",
    "trainer.samples=32",
    "trainer.checkpoint_every_samples=8",
    "trainer.validations=2",
    "trainer.progress=log",
    "trainer.num_threads=1",
]
COMPARED = (
    "val_dice",
    "best_val_dice",
    "eval_modes",
    "val_dice_per_class",
    "samples_seen",
    "steps",
    "history",
    "loss_history",  # the open logging window's loss sum is saved with the checkpoint
    "convergence",
    "per_case",
)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    run_dir = tmp_path_factory.mktemp("full") / "run"
    result = run_cli([*ARGS, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return metrics_of(run_dir)


def assert_same_results(a: dict, b: dict) -> None:
    for key in COMPARED:
        assert a[key] == pytest.approx(b[key], abs=1e-6) if isinstance(a[key], float) else a[key] == b[key], (
            key
        )


def test_same_seed_same_metrics(uninterrupted: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "again"
    result = run_cli([*ARGS, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_results(uninterrupted, metrics_of(run_dir))


def test_kill_9_then_same_command_continues_with_same_metrics(uninterrupted: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "norm_experiments.train", *ARGS, f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(
        command,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    checkpoint = run_dir / "checkpoint.pt"
    deadline = time.time() + 120
    # The record is rewritten after every checkpoint (it used to say steps 0 until the end).
    while (run_record.read(run_dir) or {}).get("steps", 0) == 0 and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists(), "no checkpoint before the kill"
    killed = metrics_of(run_dir)
    assert killed["status"] == "running"  # truthful: it did not finish
    saved = torch.load(checkpoint, weights_only=True)["state"]["step"]
    # How far it got: a checkpointed step (every 8; the kill may fall between a checkpoint and its record).
    assert killed["steps"] % 8 == 0 and killed["steps"] in (saved, saved - 8) and killed["steps"] > 0

    result = run_cli([*ARGS, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stdout + result.stderr  # continued, not restarted
    resumed = metrics_of(run_dir)
    assert resumed["status"] == "completed"
    assert_same_results(uninterrupted, resumed)


def test_sigterm_saves_checkpoint_and_exits_3(tmp_path: Path) -> None:
    run_dir = tmp_path / "term"
    command = [
        sys.executable,
        "-m",
        "norm_experiments.train",
        *ARGS,
        "trainer.samples=400",
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 120
    while not (run_dir / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, output[-2000:]
    assert "Traceback" not in output
    metrics = metrics_of(run_dir)
    assert metrics["status"] == "interrupted" and 0 < metrics["steps"] < 400
