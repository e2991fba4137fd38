"""`norm-exp-train data=msd|nnunet|folder data.root=DIR` trains on folders written by `norm-exp-synth`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import metrics_of, run_cli

# Subprocess runs of the real CLI or trainings: the full suite runs them, `pytest -m "not slow"` does not.
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("layout", ["msd", "nnunet", "folder"])
def test_train_on_a_synthesized_folder(layout: str, tmp_path: Path) -> None:
    root = tmp_path / f"dataset_{layout}"
    synth = run_cli(
        [str(root), "--layout", layout, "--cases", "6", "--shape", "24", "24", "24"],
        cwd=tmp_path,
        module="norm_experiments.data.synth_cli",
    )
    assert synth.returncode == 0, synth.stderr
    run_dir = tmp_path / "run"
    args = [
        "experiment=smoke",
        f"data={layout}",
        f"data.root={root}",
        "trainer.num_threads=1",
        f"hydra.run.dir={run_dir}",
    ]
    if layout == "folder":
        args.append("data.labels={0: background, 1: class1, 2: class2}")
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = metrics_of(run_dir)
    assert metrics["status"] == "completed"
    assert set(metrics["val_dice_per_class"]) == {"class1", "class2"}
