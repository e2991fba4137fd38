"""Where a prediction's errors are, per validation case: how much false foreground, how far from the true
foreground, whether it lies in the air around the head, and in windows that held little but air.

Why: the per-sample norms (InstanceNorm, GroupNorm) showed 3-6x BatchNorm's HD95 at similar Dice in our brain
study. HD95 grows with errors far from the true boundary, so the question is where those errors are. One
candidate cause, tested here rather than assumed: a sliding window that holds little but air or background
is rescaled to unit variance by a per-window norm, so its noise can turn into foreground. The window share of
head voxels around each false-positive voxel measures that.

Every number is a volume in mL (voxels x voxel volume), except the component count. The head is the image's
voxels above a low threshold (holes filled), so "air" means outside the imaged object; on data without air
around the object (the synthetic ellipsoids fill their volume) air volumes are 0.

The same module keeps the largest connected component of each class: nnU-Net's post-processing, a remedy for
far-away false positives whose effect the study measures (the `running_lcc` scores).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

# The fields of one case's error record, in this order (a row of a float64 tensor that ranks can add up).
FIELDS = (
    "fp_ml",  # predicted foreground where the truth is background
    "fn_ml",  # true foreground predicted as background
    "fp_components",  # connected pieces of false foreground (26-connectivity)
    "fp_far_ml",  # false foreground more than FAR_MM from any true foreground voxel
    "fp_air_ml",  # false foreground outside the head
    "fp_air_window_ml",  # false foreground where a window centred there holds < AIR_WINDOW of head voxels
)
FAR_MM = 10.0
AIR_WINDOW = 0.25
HEAD_THRESHOLD = 0.1  # of the range between the 2nd and the 99.5th intensity percentile
_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


def head_mask(image: np.ndarray) -> np.ndarray:
    """Voxels of the imaged object: above a low intensity threshold, holes filled (a 3D array)."""
    low, high = np.percentile(image, [2.0, 99.5])
    if high <= low:
        return np.ones(image.shape, dtype=bool)
    mask = image > low + HEAD_THRESHOLD * (high - low)
    return ndimage.binary_fill_holes(mask)


def case_errors(
    pred: np.ndarray, label: np.ndarray, image: np.ndarray, spacing: Sequence[float], window: Sequence[int]
) -> np.ndarray:
    """One case's FIELDS (float64) from its predicted and true class maps and its first image channel."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    truth, predicted = label > 0, pred > 0
    fp, fn = predicted & ~truth, truth & ~predicted
    found = np.zeros(len(FIELDS), dtype=np.float64)
    found[1] = fn.sum() * voxel_ml
    if not fp.any():
        return found
    found[0] = fp.sum() * voxel_ml
    found[2] = ndimage.label(fp, structure=_CONNECTIVITY)[1]
    if truth.any():
        distance = ndimage.distance_transform_edt(~truth, sampling=spacing)
        found[3] = (fp & (distance > FAR_MM)).sum() * voxel_ml
    else:
        found[3] = found[0]
    head = head_mask(image)
    found[4] = (fp & ~head).sum() * voxel_ml
    share = ndimage.uniform_filter(head.astype(np.float32), size=list(window), mode="constant")
    found[5] = (fp & (share < AIR_WINDOW)).sum() * voxel_ml
    return found


def as_record(row: torch.Tensor | np.ndarray) -> dict[str, float]:
    return {name: float(value) for name, value in zip(FIELDS, row.tolist())}


def largest_components(pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The class map with only the largest 26-connected component of each foreground class kept (the rest
    becomes background): nnU-Net's post-processing."""
    array = pred.numpy()
    kept = np.zeros_like(array)
    for c in range(1, num_classes):
        labelled, count = ndimage.label(array == c, structure=_CONNECTIVITY)
        if count == 0:
            continue
        sizes = np.bincount(labelled.ravel())
        sizes[0] = 0
        kept[labelled == int(sizes.argmax())] = c
    return torch.from_numpy(kept)
