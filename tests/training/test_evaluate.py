"""Validation scores: Dice and HD95 per class, absent classes, missed classes, and the convergence flag."""

from __future__ import annotations

import math

import pytest
import torch

from norm_experiments.training.evaluate import (
    DICE,
    HD95,
    PRESENT,
    convergence,
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


def history(*dice: float, every: int = 10) -> list[dict]:
    return [{"step": every * (i + 1), "val_dice": d} for i, d in enumerate(dice)]


def test_convergence_flags_a_run_whose_dice_still_rises_in_its_second_half() -> None:
    rising = convergence(history(0.3, 0.5, 0.6, 0.7), total_steps=40)  # validations at 10, 20, 30, 40
    assert rising == {"since_fraction": 0.5, "late_gain": pytest.approx(0.2), "still_improving": True}
    flat = convergence(history(0.3, 0.7, 0.705, 0.708), total_steps=40)
    assert flat["still_improving"] is False and flat["late_gain"] == pytest.approx(0.008)
    odd = convergence(history(0.3, 0.7, 0.705), total_steps=30)  # middle: step 15 -> the one at step 10
    assert odd["since_fraction"] == pytest.approx(1 / 3) and odd["still_improving"] is True
    falling = convergence(history(0.7, 0.6), total_steps=20)
    assert falling["still_improving"] is False and falling["late_gain"] == pytest.approx(-0.1)
    assert convergence(history(0.5), total_steps=10) is None  # one validation: nothing to compare
