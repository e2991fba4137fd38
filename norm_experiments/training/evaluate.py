"""Validation: sliding-window inference on whole volumes, per-class Dice and HD95 (the BatchNorm evaluation
modes and the split across ranks are in training.loop.Run).

What counts, per class c and validation volume v:
- c absent from v's ground truth: v says nothing about c (Dice and HD95 skipped for that pair), whatever
  the prediction holds. A class absent from every validation volume is excluded from the means and
  reported as absent, never as 0.
- c present but not predicted at all: Dice 0, and HD95 = the volume's diagonal in mm (the largest distance
  inside the image; MONAI would return inf, which would make every mean inf).
Per-class values are means over the volumes holding the class; the reported mean is over present classes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from monai.inferers import sliding_window_inference
from monai.metrics import compute_dice, compute_hausdorff_distance
from torch import nn

from norm_experiments.data.pipeline import Volume

# Rows of the per-class totals that validation sums over volumes (and over ranks): Dice sum, HD95 sum,
# number of volumes holding the class.
DICE, HD95, PRESENT = 0, 1, 2


@dataclass
class ValResult:
    """Validation scores; per-class lists are for the foreground classes 1..K, None where a class is absent."""

    dice_mean: float  # mean over present classes (nan if no class is present at all)
    dice_per_class: list[float | None]
    hd95_mean: float | None  # mm; None when surface distances were not computed (intermediate validations)
    hd95_per_class: list[float | None] | None
    absent: list[int]  # foreground classes (1-based) absent from every validation volume
    example: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (image, label, prediction) of a volume


@dataclass
class Inference:
    """How validation runs inference: window size, windows per forward, overlap, device and autocast."""

    roi_size: list[int]
    sw_batch_size: int
    overlap: float
    device: torch.device
    autocast: Callable[[], object]


def volume_scores(
    pred: torch.Tensor, label: torch.Tensor, num_classes: int, spacing: Sequence[float] | None
) -> torch.Tensor:
    """Per-class totals (rows DICE, HD95, PRESENT) of one volume from its predicted and true class maps
    (D, H, W). HD95 is computed only when `spacing` (mm per voxel) is given; its row stays 0 otherwise."""
    totals = torch.zeros(3, num_classes - 1, dtype=torch.float64)
    one_hot_pred, one_hot_label = _one_hot(pred, num_classes), _one_hot(label, num_classes)
    present = one_hot_label[0, 1:].flatten(1).any(1).bool()  # uint8 input: any() returns uint8
    if not present.any():
        return totals
    dice = compute_dice(one_hot_pred, one_hot_label, include_background=False, ignore_empty=True)[0]
    totals[DICE] = torch.where(present, dice.double(), 0.0)
    totals[PRESENT] = present.double()
    if spacing is not None:
        totals[HD95] = _hd95(one_hot_pred, one_hot_label, present, spacing)
    return totals


def _hd95(pred: torch.Tensor, label: torch.Tensor, present: torch.Tensor, spacing: Sequence[float]):
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(label.shape[2:], spacing)))
    predicted = pred[0, 1:].flatten(1).any(1).bool()
    with warnings.catch_warnings():  # empty masks are handled below; MONAI warns about each one
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(pred, label, percentile=95, spacing=list(spacing))[0].double()
    hd = torch.where(predicted, hd, diagonal)  # a missed class: the largest distance in the image
    return torch.where(present, hd, 0.0)


def summarize(totals: torch.Tensor, surface: bool, example=None) -> ValResult:
    """Means over the volumes that hold each class, and over present classes (see the module docstring)."""
    count = totals[PRESENT]
    present = count > 0

    def per_class(row: int) -> list[float | None]:
        return [float(s / n) if n > 0 else None for s, n in zip(totals[row], count)]

    def mean(values: list[float | None]) -> float:
        kept = [v for v in values if v is not None]
        return sum(kept) / len(kept) if kept else math.nan

    dice = per_class(DICE)
    hd95 = per_class(HD95) if surface else None
    absent = [c + 1 for c, p in enumerate(present.tolist()) if not p]
    return ValResult(mean(dice), dice, mean(hd95) if hd95 else None, hd95, absent, example)


@torch.inference_mode()
def score_volumes(
    model: nn.Module, volumes: list[Volume], num_classes: int, inf: Inference, surface: bool = False
) -> tuple[torch.Tensor, tuple | None]:
    """Per-class totals over `volumes` (see volume_scores) and an example slice from the first volume.

    The model is used as it is: the caller chooses train/eval/BN mode."""
    totals = torch.zeros(3, num_classes - 1, dtype=torch.float64)
    example = None
    for vol in volumes:
        image = vol.image.unsqueeze(0).to(inf.device, non_blocking=True)  # no copy if cached there already
        with inf.autocast():
            logits = sliding_window_inference(
                image, inf.roi_size, inf.sw_batch_size, model, overlap=inf.overlap, mode="gaussian"
            )
        # Scores in host memory: one-hot tensors (classes x volume) could exhaust a GPU's memory.
        pred = logits.argmax(dim=1)[0].cpu()
        label = vol.label[0].long().cpu()
        totals += volume_scores(pred, label, num_classes, vol.spacing if surface else None)
        if example is None:
            example = (vol.image[0].cpu(), label, pred)
    return totals, example


def evaluate(
    model: nn.Module, volumes: list[Volume], num_classes: int, inf: Inference, surface: bool = False
) -> ValResult:
    """Dice (and HD95 in mm when `surface`) of `model` on every validation volume."""
    totals, example = score_volumes(model, volumes, num_classes, inf, surface)
    return summarize(totals, surface, example)


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(D, H, W) class map -> (1, K, D, H, W) one-hot (uint8: an eighth of int64's memory)."""
    return torch.nn.functional.one_hot(labels, num_classes).to(torch.uint8).permute(3, 0, 1, 2).unsqueeze(0)


# Validation Dice that rose by more than this over the second half of a run marks it as still improving. Below
# it, changes between validations are within the seed-to-seed spread of short runs.
STILL_IMPROVING_DICE = 0.01
# The part of a run the flag looks at. Not just the last interval: with a cosine schedule the learning rate
# is nearly 0 over the last quarter, so a flat last quarter says little about whether more steps would help.
LATE_PART = 0.5


def convergence(history: list[dict], total_steps: int) -> dict | None:
    """Did validation Dice still rise over the second half of training? Compares the final validation with
    the last one at or before the middle of the run. None when there is none (a single validation)."""
    earlier = [h for h in history[:-1] if h["step"] <= total_steps * (1 - LATE_PART)]
    if not earlier:
        return None
    before, final = earlier[-1], history[-1]
    gain = final["val_dice"] - before["val_dice"]
    return {
        "since_fraction": before["step"] / total_steps,  # the comparison starts this far into the run
        "late_gain": gain,
        "still_improving": bool(gain > STILL_IMPROVING_DICE),
    }
