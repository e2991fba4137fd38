"""Error locations (training/error_locations.py) on volumes with a known answer: a false-positive blob in the
air at a known distance, one next to the true foreground inside the head, and the largest-component remedy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from norm_experiments.training.error_locations import FIELDS, case_errors, head_mask, largest_components

SPACING = (2.0, 2.0, 2.0)  # mm: a voxel is 8 mm^3 = 0.008 mL
VOXEL_ML = 0.008


def scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 40^3 volume: a head (a 20^3 cube of intensity 1, the rest air at 0 with faint noise), a true 6^3
    foreground cube inside it, and a prediction with two false positives."""
    rng = np.random.default_rng(0)
    image = rng.normal(0.0, 0.01, (40, 40, 40))
    image[10:30, 10:30, 10:30] += 1.0
    label = np.zeros((40, 40, 40), dtype=np.int64)
    label[17:23, 17:23, 17:23] = 1
    pred = label.copy()
    pred[23, 20, 20] = 1  # one voxel next to the truth, inside the head: 2 mm away
    pred[2:5, 2:5, 30:33] = 2  # a 3^3 blob in the air, far from everything
    return image, label, pred


def test_a_blob_in_the_air_is_counted_far_outside_the_head_and_in_air_windows():
    image, label, pred = scene()
    found = dict(zip(FIELDS, case_errors(pred, label, image, SPACING, window=(16, 16, 16))))
    assert found["fp_ml"] == pytest.approx(28 * VOXEL_ML)
    assert found["fn_ml"] == 0.0
    assert found["fp_components"] == 2
    # The blob's nearest true voxel is (17, 17, 22)-ish: more than 10 mm away; the single voxel is 2 mm away.
    assert found["fp_far_ml"] == pytest.approx(27 * VOXEL_ML)
    assert found["fp_air_ml"] == pytest.approx(27 * VOXEL_ML)
    # A 16^3 window centred on the blob holds no head voxel; one centred on the single voxel is mostly head.
    assert found["fp_air_window_ml"] == pytest.approx(27 * VOXEL_ML)


def test_missed_foreground_and_a_perfect_prediction():
    image, label, _ = scene()
    missed = label.copy()
    missed[17:23, 17:23, 17] = 0  # one 6x6 slice missed
    found = dict(zip(FIELDS, case_errors(missed, label, image, SPACING, window=(16, 16, 16))))
    assert found["fn_ml"] == pytest.approx(36 * VOXEL_ML) and found["fp_ml"] == 0.0
    assert not case_errors(label, label, image, SPACING, window=(16, 16, 16)).any()


def test_the_head_mask_fills_holes_and_leaves_the_air_out():
    image, _, _ = scene()
    image[18:22, 18:22, 18:22] = 0.0  # a dark hole inside the head is still head
    mask = head_mask(image)
    assert mask[20, 20, 20] and mask[10, 10, 10] and not mask[3, 3, 3]
    assert mask.sum() == 20**3


def test_largest_component_keeps_one_piece_per_class():
    pred = torch.zeros(20, 20, 20, dtype=torch.long)
    pred[2:8, 2:8, 2:8] = 1  # class 1: the big piece
    pred[15:17, 15:17, 15:17] = 1  # class 1: a small far piece, removed
    pred[10:12, 2:4, 2:4] = 2  # class 2: its only piece, kept
    kept = largest_components(pred, num_classes=3)
    assert int((kept == 1).sum()) == 216 and int((kept == 2).sum()) == 8
    assert int(kept[16, 16, 16]) == 0
