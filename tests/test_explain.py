"""norm-exp-explain, run as a user would: three tables and a conclusion on the smoke config, nothing written,
and a bad data.root refused with one `error:` line."""

from __future__ import annotations

import math
import re
import subprocess
from pathlib import Path

import pytest
import torch

from norm_experiments.diagnose.patch_content import PatchStats, content_rows, window_starts
from norm_experiments.diagnose.probe import bn_layers
from norm_experiments.explain import content_at_batch_1, force_batchnorm, spread, values
from norm_experiments.training.build import build, make_plan
from tests.helpers import compose_config, run_cli

# Subprocess runs of the real CLI or trainings: the full suite runs them, `pytest -m "not slow"` does not.
pytestmark = pytest.mark.slow

MODULE = "norm_experiments.explain"


def explain(args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    return run_cli(args, cwd=cwd, module=MODULE, timeout=180, env={"NORM_EXP_CACHE": str(cache)})


def section(output: str, title: str) -> list[list[str]]:
    """Rows of the table whose title starts with `title`, split into cells (2+ spaces apart)."""
    block = output.split(title, 1)[1].split("\n\n", 1)[0]
    lines = block.splitlines()[4:]  # title rest, note, header, rule
    return [re.split(r"\s{2,}", line.strip()) for line in lines]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory, synthetic_cache: Path) -> tuple[str, Path]:
    cwd = tmp_path_factory.mktemp("explain-cwd")
    # norm=group checks that BatchNorm is forced; one thread keeps the tiny convs fast on a shared CPU.
    result = explain(["experiment=smoke", "norm=group", "trainer.num_threads=1"], cwd, synthetic_cache)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result.stdout, cwd


def test_prints_four_tables_and_a_conclusion(smoke: tuple[str, Path]) -> None:
    output, _ = smoke
    titles = (
        "1. Values each channel's",
        "2. One training batch (N=2)",
        "3. Spread of batch",
        "4. What a patch",
    )
    for title in titles:
        assert title in output, output
    assert "norm=group ignored" in output
    assert (
        "Check it on real training: `norm-exp-train norm=batch data.batch_size=1 experiment=smoke" in output
    )


def test_values_per_channel_at_level_0(smoke: tuple[str, Path]) -> None:
    rows = {row[0]: row[1:] for row in section(smoke[0], "1. Values")}
    # smoke: patch 16³, batch_size 2 -> 2 × 4096 values per channel at full resolution, 4096 at batch size 1
    assert rows["encoder.0.0.1"] == ["(2, 8, 16, 16, 16)", "8,192", "4,096"]
    assert rows["encoder.2.0.1"] == ["(2, 32, 4, 4, 4)", "128", "64"]  # the bottleneck (model.depth=2)
    assert "taken over 4,096 values at the first layer and 64 at the bottleneck" in smoke[0]


def test_batch_statistics_vary_less_at_larger_batches(smoke: tuple[str, Path]) -> None:
    rows = {int(row[0]): [float(x) for x in row[1:]] for row in section(smoke[0], "3. Spread")}
    assert sorted(rows) == [1, 2, 4, 8]
    first_mean_spread = {b: cells[0] for b, cells in rows.items()}
    assert first_mean_spread[1] > 0.2  # the synthetic cases differ in gain and offset
    assert first_mean_spread[1] > 2 * first_mean_spread[8]
    assert rows[8][-1] == pytest.approx(0.35, abs=0.01)  # the 1/√b column


def test_writes_nothing_in_the_working_directory(smoke: tuple[str, Path]) -> None:
    assert list(smoke[1].iterdir()) == []  # no outputs/, no .hydra/, no log file


def test_missing_data_root_is_one_error_line(tmp_path: Path, synthetic_cache: Path) -> None:
    result = explain(["data=msd", "data.root=/nonexistent"], tmp_path, synthetic_cache)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "data.root" in errors[0], output
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_preset_runs_once_and_suggests_a_single_run(tmp_path: Path, synthetic_cache: Path) -> None:
    """experiment=norm_sweep_quick sets hydra.mode: MULTIRUN and the study sweeper: explain (and check) still
    run once, and the training command they suggest is one run too (the study refuses a single cell)."""
    args = ["experiment=norm_sweep_quick", "data=synthetic", "trainer.num_threads=1"]
    result = explain(args, tmp_path, synthetic_cache)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert result.stdout.count("1. Values each channel's") == 1
    assert list(tmp_path.iterdir()) == []  # no sweep folder
    suggested = "`norm-exp-train norm=batch data.batch_size=1 experiment=norm_sweep_quick data=synthetic"
    assert f"{suggested} trainer.num_threads=1 hydra.mode=RUN`" in result.stdout
    for multirun in (["-m"], ["hydra.mode=MULTIRUN"]):
        refused = explain([*multirun, "experiment=smoke"], tmp_path, synthetic_cache)
        assert (
            refused.returncode == 2
            and f"error: norm-exp-explain runs once: drop {multirun[0]}" in refused.stderr
        )


def test_single_run_argv() -> None:
    from norm_experiments.command_line import single_run_argv
    from norm_experiments.errors import UserError

    assert single_run_argv(["cmd", "a=1"], "cmd") == ["cmd", "a=1", "hydra.mode=RUN"]
    assert single_run_argv(["cmd", "hydra.mode=RUN", "a=1"], "cmd") == ["cmd", "a=1", "hydra.mode=RUN"]
    with pytest.raises(UserError, match="^cmd runs once: drop --multirun$"):
        single_run_argv(["cmd", "--multirun", "a=1,2"], "cmd")


def test_help(tmp_path: Path, synthetic_cache: Path) -> None:
    result = explain(["--help"], tmp_path, synthetic_cache)
    assert result.returncode == 0
    assert result.stdout.startswith("norm-exp-explain: why BatchNorm trains at batch size 1")
    assert "== Config groups (as in norm-exp-train) ==" in result.stdout and "norm: batch" in result.stdout
    assert len(result.stdout.splitlines()) < 40  # the command's own help, not the training config


def test_spread_and_values() -> None:
    assert values((2, 8, 4, 4, 4)) == 128 and values((2, 8, 4, 4, 4), n=1) == 64
    # two channels; channel 0's batch mean alternates ±1 around a within-batch variance of 3: pooled σ² = 4
    batches = [(torch.tensor([(-1.0) ** i, 0.0]), torch.tensor([3.0, 1.0])) for i in range(4)]
    mean_spread, var_spread = spread(batches)
    sd = torch.tensor([1.0, -1.0, 1.0, -1.0]).std().item()
    assert mean_spread == pytest.approx((sd / 2 + 0.0) / 2, rel=1e-5)
    assert var_spread == pytest.approx(0.0, abs=1e-6)


def test_window_starts_cover_the_axis_as_sliding_windows_do() -> None:
    assert window_starts(24, 16, 0.25) == [0, 8]  # stride 12 would end at 28: the last one flush with the end
    assert window_starts(40, 16, 0.25) == [0, 12, 24]
    assert window_starts(10, 16, 0.25) == [0]  # smaller than the patch: one (padded) window


def test_content_rows_measure_distance_from_the_pooled_statistics() -> None:
    def patch(foreground: float, mean: float, var: float) -> PatchStats:
        return PatchStats(foreground, torch.tensor([mean]), torch.tensor([var]))

    # Training patches: means -1 and +1 (variance 1 each): pooled μ = 0, σ² = 1 + 1 = 2.
    train = [patch(0.0, -1.0, 1.0), patch(0.8, 1.0, 1.0)]
    val = [patch(0.0, -1.0, 1.0), patch(0.0, -1.0, 1.0), patch(0.3, 0.0, 2.0)]
    rows = {r.label: r for r in content_rows(train, val)}
    assert rows["under 10 %"].train_share == 0.5 and rows["under 10 %"].val_share == pytest.approx(2 / 3)
    assert rows["under 10 %"].val_mean_gap == pytest.approx(1 / math.sqrt(2))
    assert rows["under 10 %"].val_var_gap == pytest.approx(0.5)  # |1 - 2| / 2
    assert rows["10-50 %"].val_mean_gap == pytest.approx(0.0) and rows["10-50 %"].train_mean_gap is None
    assert rows["all"].val_mean_gap == pytest.approx(2 / 3 / math.sqrt(2))


def _content_gap(overrides: list[str]) -> float:
    cfg = compose_config(overrides)
    force_batchnorm(cfg)
    built = build(cfg, make_plan(cfg))
    first = next(iter(bn_layers(built.model)))
    return content_at_batch_1(built, first)[-1].val_mean_gap


def test_brain_patches_lie_farther_from_running_statistics_than_ellipsoids() -> None:
    """The mechanism docs/explanation quotes, at a test's size: after the same per-case z-score, patches of
    real anatomy differ from each other by what they hold; patches of the synthetic ellipsoids do not."""
    common = ["data.patch_size=[16,16,16]", "model.depth=2", "trainer.num_threads=1", "data.intensity=zscore"]
    brain = _content_gap([*common, "data=brain", "data.brain.num_cases=4", "data.brain.spacing=4.0"])
    ellipsoids = _content_gap([*common, "experiment=smoke"])
    assert brain > 2 * ellipsoids, (brain, ellipsoids)
