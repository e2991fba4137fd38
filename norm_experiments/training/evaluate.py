"""Validation: sliding-window inference on whole volumes and per-class Dice (the BatchNorm evaluation modes
and the split across ranks are in training.loop.Run)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric
from torch import nn

from norm_experiments.data.pipeline import Volume


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
        image = vol.image.unsqueeze(0).to(inf.device, non_blocking=True)  # no copy if cached there already
        with inf.autocast():
            logits = sliding_window_inference(
                image, inf.roi_size, inf.sw_batch_size, model, overlap=inf.overlap, mode="gaussian"
            )
        # Dice in host memory: its one-hot tensors (classes x volume, int64) could exhaust a GPU's memory.
        pred = logits.argmax(dim=1, keepdim=True).cpu()
        label = vol.label.unsqueeze(0).long().cpu()
        metric(_one_hot(pred, num_classes), _one_hot(label, num_classes))
        if example is None:
            example = (vol.image[0].cpu(), label[0, 0], pred[0, 0])
    per_class = torch.nan_to_num(metric.aggregate(), nan=0.0).tolist()
    return ValResult(sum(per_class) / len(per_class), per_class, example)


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels[:, 0], num_classes).permute(0, 4, 1, 2, 3)
