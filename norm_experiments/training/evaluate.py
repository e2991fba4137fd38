"""Validation: sliding-window inference on whole volumes, per-class Dice, and BatchNorm's evaluation modes."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric
from torch import nn

from norm_experiments.data.pipeline import Volume
from norm_experiments.norms import bn_eval_mode, recompute_bn_statistics


@dataclass
class ValResult:
    dice_mean: float  # mean over foreground classes of the per-class Dice (averaged over volumes)
    dice_per_class: list[float]  # foreground classes 1..K
    example: (
        tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    )  # (image, label, prediction) of one volume


@dataclass
class Inference:
    """How validation runs inference: window size, windows per forward, overlap, device and autocast."""

    roi_size: list[int]
    sw_batch_size: int
    overlap: float
    device: torch.device
    autocast: Callable[[], object]


@torch.inference_mode()
def evaluate(model: nn.Module, volumes: list[Volume], num_classes: int, inf: Inference) -> ValResult:
    """Dice of `model` as it is (the caller chooses train/eval/BN mode) on every validation volume."""
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
    example = None
    for vol in volumes:
        image = vol.image.unsqueeze(0).to(inf.device, non_blocking=True)
        with inf.autocast():
            logits = sliding_window_inference(
                image, inf.roi_size, inf.sw_batch_size, model, overlap=inf.overlap, mode="gaussian"
            )
        pred = logits.argmax(dim=1, keepdim=True).cpu()
        label = vol.label.unsqueeze(0).long()
        metric(_one_hot(pred, num_classes), _one_hot(label, num_classes))
        if example is None:
            example = (vol.image[0], vol.label[0], pred[0, 0])
    per_class = torch.nan_to_num(metric.aggregate(), nan=0.0).tolist()
    return ValResult(sum(per_class) / len(per_class), per_class, example)


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels[:, 0], num_classes).permute(0, 4, 1, 2, 3)


def evaluate_running(model: nn.Module, volumes: list[Volume], num_classes: int, inf: Inference) -> ValResult:
    """Standard evaluation: model.eval(), so BatchNorm uses its running statistics."""
    with bn_eval_mode(model, "running"):
        return evaluate(model, volumes, num_classes, inf)


def evaluate_bn_modes(
    model: nn.Module,
    volumes: list[Volume],
    num_classes: int,
    inf: Inference,
    precise_batches: Iterable[torch.Tensor],
) -> dict[str, float]:
    """Mean foreground Dice under BatchNorm's three evaluation modes, without retraining.

    running: the running averages BatchNorm kept during training (what model.eval() uses).
    precise: population statistics recomputed over training patches after training (PreciseBN), on a copy.
    batch:   each forward pass normalizes with its own statistics (the windows of one sliding-window batch).
    """
    scores = {"running": evaluate_running(model, volumes, num_classes, inf).dice_mean}
    with bn_eval_mode(model, "batch"):
        scores["batch"] = evaluate(model, volumes, num_classes, inf).dice_mean
    precise = copy.deepcopy(model)
    recompute_bn_statistics(precise, precise_batches, inf.device)
    with bn_eval_mode(precise, "running"):
        scores["precise"] = evaluate(precise, volumes, num_classes, inf).dice_mean
    return scores
