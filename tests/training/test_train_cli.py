"""The real entry point, end to end: a smoke run writes metrics.json, TensorBoard events and weights."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from norm_experiments import run_record
from norm_experiments.training.error_locations import FIELDS as ERROR_FIELDS
from tests import helpers
from tests.helpers import assert_clean_failure, metrics_of, run_cli

# Subprocess runs of the real CLI or trainings: the full suite runs them, `pytest -m "not slow"` does not.
pytestmark = pytest.mark.slow

SMOKE = [*helpers.SMOKE, "trainer.progress=log"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One smoke run with BatchNorm at batch size 1 (the question's setting), shared by the tests below."""
    cwd = tmp_path_factory.mktemp("smoke")
    result = run_cli([*SMOKE, "norm=batch", "data.batch_size=1"], cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((cwd / "outputs" / "runs").iterdir())
    assert len(runs) == 1
    return cwd, runs[0]


def test_smoke_run_writes_truthful_metrics(smoke_run: tuple[Path, Path]) -> None:
    _, run_dir = smoke_run
    assert run_dir.name == "data.batch_size=1,experiment=smoke,norm=batch"
    metrics = metrics_of(run_dir)
    assert metrics["status"] == "completed"
    assert metrics["norm"] == "batch" and metrics["batch_size"] == 1 and metrics["seed"] == 0
    assert metrics["patches_per_volume"] == 1 and metrics["effective_batch"] == 1
    assert metrics["samples_seen"] == 16 and metrics["steps"] == 16  # trainer.samples=16 at batch 1
    assert metrics["budget_unit"] == "patches" and metrics["intensity"] == "none"
    per_class = metrics["val_dice_per_class"]
    assert set(per_class) == {"class1", "class2"} and metrics["absent_classes"] == []
    assert metrics["val_dice"] == pytest.approx(sum(per_class.values()) / 2)  # the mean of what it reports
    assert set(metrics["eval_modes"]) == set(metrics["eval_modes_hd95"]) == {"running", "precise", "batch"}
    # HD95 in mm: between 0 and the diagonal of a 24^3 volume at 1.5 x 1.5 x 2 mm.
    hd95 = metrics["val_hd95_per_class"]
    assert set(hd95) == {"class1", "class2"} and all(
        0 <= v <= 24 * (1.5**2 * 2 + 4) ** 0.5 for v in hd95.values()
    )
    assert metrics["val_hd95"] == pytest.approx(sum(hd95.values()) / 2)
    # Two validations (trainer.validations=2): half way and at the end.
    assert [h["step"] for h in metrics["history"]] == [8, 16]
    # The convergence flag: a trend through the late half of the logged training losses (every 2 steps).
    assert [h["step"] for h in metrics["loss_history"]] == list(range(2, 17, 2))
    flag = metrics["convergence"]
    assert flag["metric"] == "train_loss" and flag["points"] == 5 and flag["since_fraction"] == 0.5
    assert isinstance(flag["still_improving"], bool) and flag["still_improving"] == (flag["p"] < 0.05)
    assert metrics["accumulate_steps"] == 1 and metrics["global_batch"] == 1
    assert metrics["batch_stats_windows"] == 4  # null: trainer.sw_batch_size
    assert metrics["samples_per_s"] > 0 and 0 <= metrics["data_wait_fraction"] < 1
    assert metrics["peak_memory_mb"] > 50 and metrics["device"] == "cpu"
    assert metrics["versions"]["torch"] and metrics["wall_time_s"] > 0
    for name in ("model.pt", "best_model.pt", "checkpoint.pt", ".hydra/config.yaml", "run_config.yaml"):
        assert (run_dir / name).exists(), name


def test_per_case_scores_of_every_evaluation_mode_average_to_its_reported_score(
    smoke_run: tuple[Path, Path],
) -> None:
    metrics = metrics_of(smoke_run[1])
    per_case = metrics["per_case"]
    # running_lcc: the running mode's predictions with each class's largest component kept (a remedy)
    assert set(per_case) == {"running", "precise", "batch", "running_lcc"}
    for mode in ("running", "precise", "batch"):
        cases = per_case[mode]
        assert all(set(case["errors"]) == set(ERROR_FIELDS) for case in cases.values())
        assert len(cases) == 2 and all(name.startswith("synth_") for name in cases)  # the validation cases
        class_means = []
        for name in ("class1", "class2"):
            values = [case["dice"][name] for case in cases.values() if case["dice"][name] is not None]
            class_means.append(sum(values) / len(values))
            if mode == "running":
                assert class_means[-1] == pytest.approx(metrics["val_dice_per_class"][name], abs=1e-12)
            hd95 = [case["hd95"][name] for case in cases.values() if case["hd95"][name] is not None]
            assert len(hd95) == len(values)
        assert sum(class_means) / 2 == pytest.approx(metrics["eval_modes"][mode], abs=1e-12), mode
    assert per_case["running"] != per_case["batch"]
    assert set(per_case["running_lcc"]) == set(per_case["running"])
    for case in per_case["running_lcc"].values():  # scores only: its errors are those of running, less pieces
        assert set(case) == {"dice", "hd95"}


def test_smoke_run_tensorboard_tags(smoke_run: tuple[Path, Path]) -> None:
    _, run_dir = smoke_run
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {
        "Training/loss",
        "Training/lr",
        "Training/samples_per_s",
        "Validation/dice_mean",
        "Validation/dice_class1",
        "Validation/dice_class2",
        "Validation/dice_mean_running",
        "Validation/dice_mean_precise",
        "Validation/dice_mean_batch",
        "Validation/hd95_mean",
        "Validation/hd95_class1",
        "Validation/hd95_mean_batch",
        "Validation/hd95_mean_precise",
    }
    assert expected <= scalars, expected - scalars
    assert any(tag.startswith("bn_stats/") for tag in scalars)
    assert "Validation/slice_input_truth_prediction" in events.Tags()["images"]
    loss = events.Scalars("Training/loss")
    assert [e.step for e in loss][-1] == 16
    metrics = metrics_of(run_dir)
    assert events.Scalars("Validation/dice_mean")[-1].value == pytest.approx(metrics["val_dice"], abs=1e-6)
    assert events.Scalars("Validation/hd95_mean")[-1].value == pytest.approx(metrics["val_hd95"], rel=1e-6)
    batch_mode = events.Scalars("Validation/dice_mean_batch")[-1].value
    assert batch_mode == pytest.approx(metrics["eval_modes"]["batch"], abs=1e-6)
    # HParams view: the plugin's session summary is in the same run, not a separate time-stamped one
    hparams = events.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(
        hparams
    )
    assert not any(tag.startswith("hparam/") for tag in scalars)  # HParams reads the Validation/ scalars


def test_accumulation_at_batch_1_with_batchnorm_runs_through_the_cli(tmp_path: Path) -> None:
    """`norm-exp-train trainer.accumulate_steps=4 norm=batch data.batch_size=1`: the same 16 patches in 4
    optimizer steps of 4 micro-batches; BatchNorm's statistics still come from 1 patch."""
    args = [*SMOKE, "trainer.accumulate_steps=4", "norm=batch", "data.batch_size=1"]
    result = run_cli([*args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = metrics_of(tmp_path / "run")
    assert metrics["status"] == "completed" and metrics["accumulate_steps"] == 4
    assert metrics["steps"] == metrics["total_steps"] == 4 and metrics["samples_seen"] == 16
    assert (metrics["effective_batch"], metrics["global_batch"], metrics["bn_batch"]) == (1, 4, 1)
    assert [h["step"] for h in metrics["history"]] == [2, 4]
    assert set(metrics["per_case"]) == {"running", "precise", "batch", "running_lcc"}


def test_amp_asked_for_on_a_cpu_says_it_trains_in_float32(tmp_path: Path) -> None:
    """trainer.amp=true on a CPU trained in float32 without a word (autocast here is CUDA's)."""
    args = [*SMOKE, "trainer.amp=true", "trainer.eval_modes=false", f"hydra.run.dir={tmp_path / 'run'}"]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    line = "trainer.amp=true: autocast is for CUDA here; on cpu this run trains in float32"
    assert line in result.stdout + result.stderr


def test_same_command_again_skips_the_completed_run(smoke_run: tuple[Path, Path]) -> None:
    cwd, run_dir = smoke_run
    before = (run_dir / "metrics.json").read_text()
    result = run_cli([*SMOKE, "norm=batch", "data.batch_size=1"], cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "already completed" in result.stdout + result.stderr
    # a user who fixed a label and ran the command again learns how to train it again
    assert "nothing to do (trainer.overwrite=true trains it again" in result.stdout + result.stderr
    assert (run_dir / "metrics.json").read_text() == before


def test_resume_names_a_run_folder(smoke_run: tuple[Path, Path]) -> None:
    """`resume=RUN_DIR` re-runs that folder's own command in it (folder names hold '=' and ',')."""
    cwd, run_dir = smoke_run
    result = run_cli([f"resume={run_dir.relative_to(cwd)}"], cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "already completed" in result.stdout + result.stderr
    assert sorted(p.name for p in (cwd / "outputs" / "runs").iterdir()) == [run_dir.name]  # no new folder


def test_resume_of_a_missing_folder_is_one_line(tmp_path: Path) -> None:
    result = run_cli(["resume=outputs/runs/nothing-here"], cwd=tmp_path)
    assert_clean_failure(result)
    # it says the folder does not exist (not "not a run folder"), and leaves nothing behind
    assert result.stderr == "error: resume=outputs/runs/nothing-here: no such folder\n"
    assert list(tmp_path.iterdir()) == []


def test_a_completed_run_writes_every_record_field(smoke_run: tuple[Path, Path]) -> None:
    """metrics.json is built by run_record.RunRecord: a completed BatchNorm run writes exactly its fields (the
    reference page is generated from them, see tests/test_run_record.py)."""
    _, run_dir = smoke_run
    assert set(metrics_of(run_dir)) == run_record.FIELDS - {"group_layers"}  # no GroupNorm layer in it


def test_the_summary_lines_of_a_run(tmp_path: Path, capsys) -> None:
    """A run without a score (no validation case holds a class) prints none instead of failing to format it;
    a run of a sweep points TensorBoard at its sweep, where the grouped curves are."""
    from norm_experiments.train import _print_summary

    sweep = tmp_path / "sweeps" / "s"
    run = sweep / "norm=batch" / "data.batch_size=1,seed=0"
    run.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("{}\n")
    _print_summary({"val_dice": None, "eval_modes": {"running": None, "batch": 0.5}}, run)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "val_dice=none (eval mode)  running=none  batch=0.5000"
    assert lines[1].endswith(f"tensorboard --logdir {sweep}")
    alone = tmp_path / "runs" / "x"
    alone.mkdir(parents=True)
    _print_summary({"val_dice": 0.25}, alone)
    assert capsys.readouterr().out.splitlines()[1].endswith(f"tensorboard --logdir {tmp_path / 'runs'}")
    # A run folder of the user's choosing (hydra.run.dir=...) is named itself, never the folder above it.
    chosen = tmp_path / "my_experiment"
    chosen.mkdir()
    _print_summary({"val_dice": 0.25}, chosen)
    assert capsys.readouterr().out.splitlines()[1].endswith(f"tensorboard --logdir {chosen}")
