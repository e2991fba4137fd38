"""Validation scores: Dice and HD95 per class and per case, absent classes, missed classes, the windows of
the batch-statistics mode, and the convergence flag."""

from __future__ import annotations

import math
import random

import pytest
import torch
from scipy import stats

from norm_experiments.training.convergence import convergence, trend
from norm_experiments.training.evaluate import (
    DICE,
    HD95,
    PRESENT,
    Inference,
    summarize,
    volume_scores,
)

SPACING = (2.0, 1.0, 1.0)  # mm per voxel along D, H, W
DIAGONAL = math.sqrt(40**2 + 20**2 + 20**2)  # a 20^3 volume at SPACING


def slab(start: int, stop: int, value: int = 1, shape=(20, 20, 20)) -> torch.Tensor:
    """A class map holding `value` on whole planes start..stop-1 along D."""
    volume = torch.zeros(shape, dtype=torch.long)
    volume[start:stop] = value
    return volume


def test_a_shifted_slab_has_the_shift_as_hd95_in_mm() -> None:
    totals = volume_scores(slab(12, 14), slab(8, 10), 2, SPACING)
    assert totals[DICE].tolist() == [0.0]
    assert totals[HD95].tolist() == [pytest.approx(8.0)]  # 4 voxels x 2 mm along D
    assert totals[PRESENT].tolist() == [1.0]


def test_a_perfect_prediction_scores_dice_1_and_hd95_0() -> None:
    totals = volume_scores(slab(8, 10), slab(8, 10), 2, SPACING)
    assert totals[:, 0].tolist() == [1.0, 0.0, 1.0]


def test_a_missed_class_gets_the_volume_diagonal_and_an_absent_one_counts_nowhere() -> None:
    label = slab(8, 10)  # class 1 present; class 2 absent
    pred = slab(0, 2, value=2)  # predicts only class 2, where the truth has none
    totals = volume_scores(pred, label, 3, SPACING)
    assert totals[DICE].tolist() == [0.0, 0.0]
    assert totals[HD95].tolist() == [pytest.approx(DIAGONAL), 0.0]
    assert totals[PRESENT].tolist() == [1.0, 0.0]


def test_without_spacing_no_surface_distance_is_computed() -> None:
    totals = volume_scores(slab(12, 14), slab(8, 10), 2, None)
    assert totals[HD95].tolist() == [0.0] and totals[PRESENT].tolist() == [1.0]


def test_means_skip_classes_absent_from_every_volume() -> None:
    """A rare class missing from the validation split is reported as absent, not as Dice 0 in the mean."""
    first = volume_scores(slab(8, 10), slab(8, 10), 3, SPACING)  # class 1 perfect, class 2 absent
    second = volume_scores(slab(12, 14), slab(8, 10), 3, SPACING)  # class 1 missed by 4 voxels
    result = summarize(first + second, surface=True)
    assert result.dice_per_class == [pytest.approx(0.5), None]
    assert result.dice_mean == pytest.approx(0.5)  # not (0.5 + 0) / 2
    assert result.hd95_per_class == [pytest.approx(4.0), None]  # (0 + 8) / 2 volumes
    assert result.hd95_mean == pytest.approx(4.0)
    assert result.absent == [2]


def test_no_class_anywhere_gives_nan_not_zero() -> None:
    empty = torch.zeros(20, 20, 20, dtype=torch.long)
    result = summarize(volume_scores(empty, empty, 2, SPACING), surface=True)
    assert math.isnan(result.dice_mean) and result.absent == [1] and result.dice_per_class == [None]


def test_per_case_scores_keep_each_volume_and_average_to_the_reported_means() -> None:
    """per_case holds every case's own Dice and HD95 (None where the case lacks the class), and the mean over
    the cases holding a class is the per-class value the run reports (val_dice is their mean)."""
    cases = torch.stack(
        [
            volume_scores(slab(8, 10), slab(8, 10), 3, SPACING),  # class 1 perfect; class 2 absent
            volume_scores(slab(12, 14), slab(8, 10), 3, SPACING),  # class 1 missed by 4 voxels
            volume_scores(slab(8, 10, value=2), slab(8, 11, value=2), 3, SPACING),  # class 2 only: Dice 0.8
        ]
    )
    result = summarize(cases, surface=True, case_names=["a", "b", "c"])
    per_case = result.per_case(["liver", "tumour"])
    assert per_case == {
        "a": {"dice": {"liver": 1.0, "tumour": None}, "hd95": {"liver": 0.0, "tumour": None}},
        "b": {"dice": {"liver": 0.0, "tumour": None}, "hd95": {"liver": pytest.approx(8.0), "tumour": None}},
        "c": {"dice": {"liver": None, "tumour": pytest.approx(0.8)}, "hd95": {"liver": None, "tumour": 2.0}},
    }
    for c, name in enumerate(["liver", "tumour"]):
        present = [case["dice"][name] for case in per_case.values() if case["dice"][name] is not None]
        assert result.dice_per_class[c] == pytest.approx(sum(present) / len(present))
    assert result.dice_mean == pytest.approx((0.5 + 0.8) / 2)
    # the same totals as summing first: one code path for the means
    assert summarize(cases.sum(0), surface=True).dice_per_class == result.dice_per_class


def test_per_case_hd95_is_none_when_surface_distances_were_not_computed() -> None:
    cases = volume_scores(slab(8, 10), slab(8, 10), 2, None).unsqueeze(0)
    per_case = summarize(cases, surface=False, case_names=["a"]).per_case(["c1"])
    assert per_case == {"a": {"dice": {"c1": 1.0}, "hd95": {"c1": None}}}


def test_only_the_batch_mode_batches_windows_by_batch_stats_windows() -> None:
    inf = Inference([16, 16, 16], 4, 0.25, torch.device("cpu"), lambda: None)
    assert inf.for_mode("batch").sw_batch_size == 4  # null: sw_batch_size
    alone = Inference([16, 16, 16], 4, 0.25, torch.device("cpu"), lambda: None, batch_stats_windows=1)
    assert alone.for_mode("batch").sw_batch_size == 1 and alone.for_mode("running").sw_batch_size == 4


def losses(values: list[float | None], every: int = 1) -> list[dict]:
    return [{"step": every * (i + 1), "loss": v} for i, v in enumerate(values)]


def noisy(start: float, per_step: float, steps: int, noise: float, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [start + per_step * i + rng.gauss(0, noise) for i in range(steps)]


def test_trend_matches_scipys_least_squares_fit() -> None:
    xs, ys = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0], [1.0, 0.9, 0.95, 0.7, 0.72, 0.6]
    slope, se = trend(xs, ys)
    reference = stats.linregress(xs, ys)
    assert slope == pytest.approx(reference.slope) and se == pytest.approx(reference.stderr)


def test_a_loss_still_falling_through_its_noise_is_still_improving() -> None:
    history = losses(noisy(1.0, -0.005, 40, noise=0.02))  # falls 0.1 over the late 20 steps, noise 0.02
    flag = convergence(history, total_steps=40)
    assert flag is not None and flag["still_improving"] is True and flag["metric"] == "train_loss"
    assert flag["points"] == 21 and flag["since_fraction"] == 0.5  # steps 20..40
    late = [h for h in history if h["step"] >= 20]
    reference = stats.linregress([h["step"] / 40 for h in late], [h["loss"] for h in late])
    assert flag["slope"] == pytest.approx(reference.slope) and flag["se"] == pytest.approx(reference.stderr)
    assert flag["t"] == pytest.approx(reference.slope / reference.stderr)
    assert flag["p"] == pytest.approx(reference.pvalue / 2) and flag["p"] < 0.05  # one-sided


def test_a_flat_noisy_or_rising_loss_is_not_still_improving() -> None:
    flat = convergence(losses(noisy(0.5, 0.0, 40, noise=0.05, seed=3)), total_steps=40)
    assert flat is not None and flat["still_improving"] is False and flat["p"] > 0.05
    # A fall hidden in noise: first and last late points (steps 5 and 9) would have called it a gain.
    hidden = [0.6, 0.2, 0.9, 0.1, 0.7, 0.3, 0.8, 0.2, 0.5]
    weak = convergence(losses(hidden), total_steps=9)
    assert hidden[-1] < hidden[4] and weak is not None and weak["still_improving"] is False
    rising = convergence(losses(noisy(0.5, 0.01, 40, noise=0.01)), total_steps=40)
    assert rising is not None and rising["still_improving"] is False and rising["slope"] > 0


def test_the_flag_needs_three_finite_points_in_the_late_half() -> None:
    assert convergence(losses([1.0, 0.9, 0.8]), total_steps=3) is None  # late half: steps 2 and 3 only
    assert convergence([], total_steps=10) is None
    skipped = convergence(losses([1.0, 0.9, 0.8, None, 0.6, 0.5]), total_steps=6)  # step 4 was not finite
    assert skipped is not None and skipped["points"] == 3  # steps 3, 5, 6


def test_points_exactly_on_a_line_decide_by_the_sign_of_the_slope() -> None:
    falling = convergence(losses([1.0, 0.9, 0.8, 0.7]), total_steps=4)  # steps 2, 3, 4
    assert falling is not None and falling["points"] == 3 and falling["se"] == pytest.approx(0, abs=1e-12)
    assert falling["still_improving"] is True and falling["slope"] == pytest.approx(-0.4)  # per whole run
    rising = convergence(losses([0.7, 0.8, 0.9, 1.0]), total_steps=4)
    assert rising is not None and rising["still_improving"] is False


@pytest.mark.parametrize(
    "windows, expected", [(None, {"batch_alone", "precise_more"}), (1, {"precise_more"})]
)
def test_remedy_modes_score_each_window_alone_and_precise_bn_over_more_patches(
    tmp_path, synthetic_cache, monkeypatch, windows, expected
) -> None:
    from norm_experiments.training.evaluate import (
        REMEDY_PRECISE_FACTOR,
        evaluate_bn_modes,
        evaluate_built,
        precise_bn_batches,
    )
    from tests.helpers import SMOKE, built_run

    monkeypatch.setenv("NORM_EXP_CACHE", str(synthetic_cache))
    overrides = [*SMOKE, "norm=batch", "trainer.remedy_modes=true"]
    if windows is not None:
        overrides.append(f"trainer.batch_stats_windows={windows}")
    b = built_run(tmp_path, overrides).built
    scores = evaluate_bn_modes(b, evaluate_built(b, b.model, surface=True))
    assert set(scores) == {"running", "batch", "precise"} | expected
    if windows is None:  # each window alone is "batch" mode with one window per forward
        alone = evaluate_built(b, b.model, "batch", surface=True, windows=1)
        assert scores["batch_alone"].dice_mean == pytest.approx(alone.dice_mean)
    patches = sum(batch.shape[0] for batch in precise_bn_batches(b, REMEDY_PRECISE_FACTOR * 4))
    assert patches >= REMEDY_PRECISE_FACTOR * 4 > sum(x.shape[0] for x in precise_bn_batches(b))
    off = built_run(tmp_path, [*SMOKE, "norm=batch"]).built
    assert set(evaluate_bn_modes(off, evaluate_built(off, off.model))) == {"running", "batch", "precise"}
