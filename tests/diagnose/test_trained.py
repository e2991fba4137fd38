"""norm-exp-explain trained=RUN (diagnose/trained.py): per-layer gaps against a direct computation on a small
network, the window grid, and the command on a real trained run folder."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from norm_experiments.diagnose.trained import grid, layer_gaps, measure_volume, starts, window_dice
from norm_experiments.errors import UserError
from norm_experiments.explain import explain_trained
from tests.helpers import SMOKE, assert_clean_failure, compose_config, run_cli


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv3d(1, 3, 3, padding=1), nn.BatchNorm3d(3), nn.ReLU(), nn.Conv3d(3, 2, 1), nn.BatchNorm3d(2)
    )
    with torch.no_grad():
        net[1].running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
        net[1].running_var.copy_(torch.tensor([0.5, 2.0, 1.0]))
        net[4].running_mean.copy_(torch.tensor([0.05, 0.4]))
        net[4].running_var.copy_(torch.tensor([0.3, 1.5]))
    return net


def direct_gaps(bn: nn.BatchNorm3d, inp: torch.Tensor) -> tuple[float, float]:
    mu = inp.mean(dim=(0, 2, 3, 4))
    var = inp.var(dim=(0, 2, 3, 4), unbiased=False)
    rv = bn.running_var + bn.eps
    return float(((mu - bn.running_mean).abs() / rv.sqrt()).mean()), float(
        ((var - bn.running_var).abs() / rv).mean()
    )


def test_layer_gaps_match_a_direct_computation_in_eval_mode():
    net = small_net()
    x = torch.randn(1, 1, 6, 6, 6) * 2 + 1
    mean_gap, var_gap, logits = layer_gaps(net, x)
    with torch.no_grad():
        net.eval()
        first = net[0](x)  # the input of the first BatchNorm
        second = net[3](net[2](net[1](first)))  # the second's, after the first normalized with running stats
        expected = net[4](second)
    for name, inp in (("1", first), ("4", second)):
        mean, var = direct_gaps(net[int(name)], inp)
        assert mean_gap[name] == pytest.approx(mean, rel=1e-6) and var_gap[name] == pytest.approx(
            var, rel=1e-6
        )
    assert torch.allclose(logits, expected)
    assert net[1].running_mean.tolist() == pytest.approx([0.1, -0.2, 0.3])  # nothing updated


def test_the_grid_covers_the_volume_and_ends_at_its_edge():
    assert starts(20, 8) == [0, 8, 12] and starts(16, 8) == [0, 8] and starts(5, 8) == [0]
    covered = torch.zeros(20, 17, 16, dtype=torch.int)
    for where in grid((20, 17, 16), (8, 8, 8)):
        covered[where] += 1
    assert covered.min() >= 1 and len(list(grid((20, 17, 16), (8, 8, 8)))) == 3 * 3 * 2


def test_window_dice_and_a_volume_measured_window_by_window():
    pred, label = torch.zeros(4, 4, 4, dtype=torch.long), torch.zeros(4, 4, 4, dtype=torch.long)
    label[:2] = 1
    pred[:1] = 1
    assert window_dice(pred, label, 2) == pytest.approx(2 * 16 / (32 + 16))
    assert window_dice(pred, torch.zeros_like(label), 2) is None
    net = small_net()
    image = torch.zeros(1, 8, 8, 8)
    image[:, 2:6, 2:6, 2:6] = 1.0  # a head in the middle of air
    volume = SimpleNamespace(name="case", image=image, label=(image > 0).long())
    windows = measure_volume(net, volume, (4, 4, 4), num_classes=2)
    assert len(windows) == 8 and all(w.case == "case" for w in windows)
    assert all(w.head_share == pytest.approx(0.125) for w in windows)  # each 4^3 corner holds 2^3 of the head
    assert all(set(w.mean_gap) == {"1", "4"} and 0.0 <= w.changed <= 1.0 for w in windows)
    assert not any(math.isnan(w.mean_gap["1"]) for w in windows)


def test_a_run_without_batchnorm_is_refused_in_one_line(tmp_path, synthetic_cache, monkeypatch):
    monkeypatch.setenv("NORM_EXP_CACHE", str(synthetic_cache))
    (tmp_path / "model.pt").write_bytes(b"")  # the norm is refused before the weights are read
    with pytest.raises(UserError, match="its norm is instance; this measures running statistics"):
        explain_trained(compose_config([*SMOKE, "norm=instance"]), tmp_path)


def test_an_unfinished_run_is_named_before_the_data_loads(tmp_path, monkeypatch):
    """A run folder without model.pt said '.../model.pt: no such file', after loading the data."""
    monkeypatch.setenv("NORM_EXP_CACHE", str(tmp_path / "no_cache"))  # the data would be generated here
    with pytest.raises(UserError) as found:
        explain_trained(compose_config([*SMOKE, "norm=batch"]), tmp_path)
    assert str(found.value) == (
        f"trained={tmp_path}: the run has no model.pt (it is written when the run completes); this measures a "
        "finished run's network"
    )
    assert not (tmp_path / "no_cache").exists()


@pytest.mark.slow
def test_the_command_on_a_trained_run(tmp_path, synthetic_cache):
    env = {"NORM_EXP_CACHE": str(synthetic_cache)}
    result = run_cli([*SMOKE, "norm=batch", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    result = run_cli(
        [f"trained={tmp_path / 'run'}"], cwd=tmp_path, module="norm_experiments.explain", env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "T1. Each BatchNorm layer of the trained network" in out and "T2. What a window holds" in out
    assert "- The running statistics sit farthest from the windows' own at " in out
    assert "Not the run's own" not in out
    assert not (tmp_path / "outputs").exists()  # writes nothing
    # A value given on the command line is not called the run's own.
    result = run_cli(
        [f"trained={tmp_path / 'run'}", "data.patch_size=[8,8,8]"],
        cwd=tmp_path,
        module="norm_experiments.explain",
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "in windows of [8, 8, 8]." in result.stdout
    # Another norm given here: named as given, not as the run's ("its norm is group" of a BatchNorm run).
    other = run_cli(
        [f"trained={tmp_path / 'run'}", "norm=group"],
        cwd=tmp_path,
        module="norm_experiments.explain",
        env=env,
    )
    assert_clean_failure(
        other, "norm.name: batch -> group given here; trained= measures the run's own network"
    )
    assert (
        "Not the run's own (its run_config.yaml says otherwise: given here, or a default since changed): "
        in result.stdout
    )
    assert "data.patch_size: [" in result.stdout
    assert "-> [8, 8, 8]." in result.stdout
    missing = run_cli(
        [f"trained={tmp_path / 'nothing'}"], cwd=tmp_path, module="norm_experiments.explain", env=env
    )
    assert_clean_failure(missing, "nothing")


def test_a_trained_folder_that_is_missing_or_not_a_run_is_named_as_trained(tmp_path):
    from norm_experiments.explain import trained_argv

    with pytest.raises(UserError, match=r"^trained=\S+gone: no such folder$"):
        trained_argv(["norm-exp-explain", f"trained={tmp_path / 'gone'}"])
    with pytest.raises(UserError, match=r"^trained=\S+: not a run folder \(no \S+overrides.yaml\)$"):
        trained_argv(["norm-exp-explain", f"trained={tmp_path}"])
    # The model file of a run instead of its folder: the line names the folder to give.
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- norm=batch\n")
    (run / "best_model.pt").write_bytes(b"weights")
    with pytest.raises(UserError) as found:
        trained_argv(["norm-exp-explain", f"trained={run / 'best_model.pt'}"])
    assert str(found.value) == f"trained={run / 'best_model.pt'}: a file; give its run folder: trained={run}"


def windows_of(case: str, gaps: list[float], changed: list[float]) -> list:
    from norm_experiments.diagnose.trained import Window

    return [
        Window(case, 0.5, 0.1, {"a": g, "b": g}, {"a": 0.0, "b": 0.0}, c, None, None)
        for g, c in zip(gaps, changed, strict=True)
    ]


def test_the_rank_correlation_interval_resamples_volumes_and_the_trend_is_stated_only_where_it_excludes_0():
    from norm_experiments.diagnose.trained import (
        Measured,
        rank_correlation,
        rho_intervals,
        rho_level,
        trend_sentence,
    )

    # Within every volume the windows with the larger gap change more at layer "a" (rho +1 in each volume);
    # layer "b" is told to go the same way in 4 volumes and the other way in 4: no direction over volumes.
    found = Measured(["a", "b"])
    for i in range(8):
        found.windows += windows_of(
            f"case{i}", [0.1, 0.2, 0.3, 0.4], [0.01 * i, 0.01 * i + 0.1, 0.01 * i + 0.2, 0.01 * i + 0.3]
        )
    for w in found.windows:
        flip = int(w.case[-1]) % 2 == 1
        w.mean_gap["b"] = (0.5 - w.mean_gap["a"]) if flip else w.mean_gap["a"]
    level = rho_level(found)
    assert level == pytest.approx(0.975)
    intervals = rho_intervals(found, level)
    assert intervals["a"][0] > 0.5  # +0.9 over windows, and every resampled study agrees on the sign
    assert intervals["b"][0] < 0 < intervals["b"][1]
    assert intervals == rho_intervals(found, level)  # a fixed seed: the same intervals every time
    rhos = {
        n: rank_correlation([w.mean_gap[n] for w in found.windows], [w.changed for w in found.windows])
        for n in "ab"
    }
    sentence = trend_sentence(found, rhos, intervals)
    assert "at 1 of 2 layers the windows with the larger gap change their prediction more" in sentence
    assert "at 1 of 2 layers the direction is inconclusive (the interval includes 0)" in sentence
    assert "less" not in sentence
    # The vectorized rho of a draw is scipy's: the whole sample as one draw.
    from norm_experiments.diagnose.trained import _spearman_columns, bootstrap_draws

    x = np.array([[w.mean_gap["a"], w.mean_gap["b"]] for w in found.windows])
    y = np.array([w.changed for w in found.windows])
    np.testing.assert_allclose(_spearman_columns(x, y), [rhos["a"], rhos["b"]], rtol=1e-12)
    assert bootstrap_draws(level) == 2000  # 25 draws in each 1.25 % tail
    # Four volumes (fewer than five): too few to resample, no interval, no direction claimed.
    few = Measured(["a"], [w for w in found.windows if w.case in ("case0", "case2", "case4", "case6")])
    assert all(math.isnan(v) for v in rho_intervals(few, 0.95)["a"])
    assert (
        "no direction is shown (no interval: fewer than 5 volumes, or a side without spread)"
        in trend_sentence(few, {"a": 1.0}, rho_intervals(few, 0.95))
    )
