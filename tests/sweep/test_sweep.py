"""Real multiruns through the CLI: a 2x2 sweep gives a 4-cell report, running it again skips all 4, an
impossible cell is recorded as failed while the others complete; joblib runs jobs in parallel; submitit's
local executor (the SLURM launcher's code path, without a cluster) runs a 2-cell sweep."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.helpers import assert_clean_failure, metrics_of, no_result_left, run_cli

# Subprocess runs of the real CLI or trainings: the full suite runs them, `pytest -m "not slow"` does not.
pytestmark = pytest.mark.slow

# Patch 4^3 at depth 2 gives a 1x1x1 bottleneck: BatchNorm at batch size 1 is impossible there
# (the pre-flight check refuses it), every other cell trains. Fast, and a natural failing cell.
GRID = [
    "-m",
    "experiment=smoke",
    "name=grid",
    "norm=batch,group",
    "data.batch_size=1,2",
    "data.patch_size=[4,4,4]",
    "trainer.num_threads=1",
]


def statuses(sweep_dir: Path) -> dict[str, str]:
    return {
        str(p.parent.relative_to(sweep_dir)): json.loads(p.read_text())["status"]
        for p in sweep_dir.rglob("metrics.json")
    }


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    cwd = tmp_path_factory.mktemp("sweep")
    result = run_cli(GRID, cwd=cwd)
    return cwd, result


def test_grid_sweep_reports_four_cells_with_the_failure(grid_sweep) -> None:
    cwd, result = grid_sweep
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = cwd / "outputs" / "sweeps" / "grid"
    found = statuses(sweep_dir)
    assert len(found) == 4
    failed = [name for name, status in found.items() if status == "failed"]
    # the swept keys only, in the order of the command line, grouped by the first one
    assert failed == ["norm=batch/data.batch_size=1"]
    assert sorted(found.values()) == ["completed", "completed", "completed", "failed"]
    error = metrics_of(sweep_dir / failed[0])["error"]
    assert "one value per channel" in error
    # the end-of-sweep report: files written and the table printed
    for name in (
        "report.md",
        "report.html",
        "summary.json",
        "results.csv",
        "runs.csv",
        "dice_vs_batch_size.png",
    ):
        assert (sweep_dir / name).exists(), name
    with open(sweep_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 4
    assert "1 failed" in result.stdout + result.stderr or "failed" in (sweep_dir / "report.md").read_text()
    assert "| group" in result.stdout
    # progress, basic launcher: one line per run started and done, the failed cell said so
    assert "[sweep] run 1 of 4 started: norm=batch,data.batch_size=1 (1 running, 0 done)" in result.stdout
    assert "[sweep] run 1 of 4 done: norm=batch,data.batch_size=1  failed (its metrics.json says why)" in (
        result.stdout
    )
    assert "[sweep] run 4 of 4 done: norm=group,data.batch_size=2  val_dice=" in result.stdout


def test_same_sweep_again_skips_completed_and_retries_failed(grid_sweep) -> None:
    cwd, _ = grid_sweep
    sweep_dir = cwd / "outputs" / "sweeps" / "grid"
    before = {p: p.stat().st_mtime for p in sweep_dir.rglob("model.pt")}
    result = run_cli(GRID, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 skipped (already completed)" in result.stdout + result.stderr
    assert {p: p.stat().st_mtime for p in sweep_dir.rglob("model.pt")} == before  # nothing retrained
    assert sorted(statuses(sweep_dir).values()) == ["completed", "completed", "completed", "failed"]


def test_joblib_runs_two_jobs_in_parallel(tmp_path: Path) -> None:
    result = run_cli(
        [
            "-m",
            "experiment=smoke",
            "name=par",
            "norm=batch,group",
            "seed=0,1",
            "trainer.num_threads=1",
            "trainer.samples=24",  # long enough that neither worker is free before the other starts
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    sweep_dir = tmp_path / "outputs" / "sweeps" / "par"
    runs = [json.loads(p.read_text()) for p in sweep_dir.rglob("metrics.json")]
    assert sorted(r["seed"] for r in runs) == [0, 0, 1, 1] and {r["status"] for r in runs} == {"completed"}
    # the sweep's progress: "run k of 4" once per run started and once per run done, an ETA until the last;
    # of the runs' own step lines only those with a new validation score or quarter reach the console
    lines = result.stdout.splitlines()
    done = [line for line in lines if line.startswith("[sweep] run ") and " done: " in line]
    assert [line.split()[2] for line in done] == ["1", "2", "3", "4"] and all(" of 4 " in x for x in done)
    scores = {run["norm"] + str(run["seed"]): run["val_dice"] for run in runs}
    for line in done:  # each line's score is its run's metrics.json score
        name = line.split(" done: ")[1].split()[0]  # norm=batch,seed=1
        norm, seed = (part.split("=")[1] for part in name.split(","))
        assert f"val_dice={scores[norm + seed]:.4f}" in line
    assert all("ETA" in line for line in done[:3]) and "ETA" not in done[3] and "(100 %," in done[3]
    assert sum(" started: " in line for line in lines) == 4
    steps = [line for line in lines if " step " in line]
    assert steps and len(steps) <= 4 * 5, steps  # at most the quarters and the validation of each run
    # each run ran in its own joblib worker process (the PID is part of TensorBoard's event-file name),
    # not one after the other in this process as Hydra's basic launcher does
    pids = {p.name.split(".")[-2] for p in sweep_dir.rglob("events.out.tfevents.*")}
    assert len(pids) == 2


def test_submitit_local_executor_runs_a_two_cell_sweep(tmp_path: Path) -> None:
    """The SLURM launcher preset cannot reach a cluster here; submitit's local executor runs the same
    launcher code path (pickled jobs, separate processes, per-job folders) on this machine."""
    result = run_cli(
        [
            "-m",
            "experiment=smoke",
            "name=sub",
            "norm=batch,group",
            "trainer.num_threads=1",
            "hydra/launcher=slurm_local",
        ],
        cwd=tmp_path,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = tmp_path / "outputs" / "sweeps" / "sub"
    assert sorted(statuses(sweep_dir).values()) == ["completed", "completed"]
    assert (sweep_dir / ".submitit").is_dir()


def test_unwritable_multirun_yaml_is_one_line_and_no_run(tmp_path: Path) -> None:
    """Hydra's sweeper writes multirun.yaml first and shows a traceback when it cannot (a disk filled after the
    free-space check, a folder in the way); the sweep callback writes it first and says so in one line."""
    (tmp_path / "sw" / "multirun.yaml").mkdir(parents=True)  # the write fails with EISDIR
    result = run_cli(
        ["-m", "experiment=smoke", "seed=0,1", "hydra.sweep.dir=sw", "trainer.num_threads=1"], tmp_path
    )
    assert_clean_failure(result, "error: could not write sw/multirun.yaml: EISDIR")
    assert no_result_left(tmp_path) and not list(tmp_path.rglob("metrics.json"))


def test_a_dice_of_zero_is_a_result_not_a_failure() -> None:
    """A run that predicts no foreground scores Dice 0.0: the sweep's progress line shows that score; only a
    run without one (NaN: failed, or no class present) reads as failed."""
    import math

    from hydra.core.utils import JobReturn, JobStatus

    from norm_experiments.sweep.progress import outcome
    from norm_experiments.train import sweep_value

    assert sweep_value({"val_dice": 0.0}) == 0.0
    assert math.isnan(sweep_value({"val_dice": None})) and math.isnan(sweep_value({}))
    done = JobReturn(status=JobStatus.COMPLETED, _return_value=sweep_value({"val_dice": 0.0}))
    assert outcome(done) == "val_dice=0.0000"
    none = JobReturn(status=JobStatus.COMPLETED, _return_value=sweep_value({"val_dice": None}))
    assert outcome(none) == "failed (its metrics.json says why)"
