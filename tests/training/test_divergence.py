"""A NaN loss stops the run with status `diverged`, exit 4 and a message naming the step; the best
weights saved before are kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import metrics_of, run_cli

# Subprocess runs of the real CLI or trainings: the full suite runs them, `pytest -m "not slow"` does not.
pytestmark = pytest.mark.slow


def test_nan_loss_is_reported_as_diverged(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # An absurd learning rate blows the weights up within a few steps (no norm to absorb it).
    args = [
        "experiment=smoke",
        "norm=none",
        "optim.lr=1e8",
        "optim.warmup_fraction=0",
        "trainer.samples=64",
        "trainer.num_threads=1",
        f"hydra.run.dir={run_dir}",
    ]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 4, result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "loss became nan at step" in errors[0]
    metrics = metrics_of(run_dir)
    assert metrics["status"] == "diverged" and "at step" in metrics["error"]
    assert not (run_dir / "model.pt").exists()  # no final weights from a diverged state
