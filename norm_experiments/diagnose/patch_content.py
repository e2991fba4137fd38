"""What a patch holds decides its BatchNorm statistics at batch size 1: the measurement behind table 4 of
`norm-exp-explain`.

At batch size 1 BatchNorm normalizes each training patch with that patch's own statistics, and model.eval()
replaces them by running averages over the training patches. How far one patch's statistics lie from those
averages depends on what the patch holds: a window of air outside the head, one of cortex and one of deep white
matter have different means and variances after any per-case z-score, whereas a window of textured background
and one with a small object in it barely differ. This module measures it, at the first BatchNorm layer of the
configured model (freshly initialised: its input is a fixed linear filter of the image), for

- training patches at batch size 1, drawn as training draws them (data.foreground_fraction centred on labels);
- validation windows, the grid sliding-window inference evaluates (data.patch_size, trainer.sw_overlap),

grouped by their foreground share (voxels with a label > 0). Distances are per channel, in units of the
pooled σ of the training patches (what running statistics converge to), then averaged over channels: the
same units as table 2 of norm-exp-explain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from norm_experiments.data.pipeline import BatchSampler, Volume
from norm_experiments.diagnose.probe import batch_stats, forward_until

TRAIN_PATCHES = 64  # training patches drawn at batch size 1
# Foreground share bins: (label, lower bound inclusive, upper bound exclusive).
BINS = (("under 10 %", 0.0, 0.1), ("10-50 %", 0.1, 0.5), ("50 % and more", 0.5, 1.01))


@dataclass
class PatchStats:
    foreground: float  # share of voxels with a label > 0
    mean: torch.Tensor  # per channel, at the measured layer
    var: torch.Tensor


@dataclass
class ContentRow:
    label: str
    train_share: float  # of training patches in this bin
    val_share: float  # of validation windows in this bin
    train_mean_gap: float | None  # mean over the bin's patches of |μ_p − μ| / σ (None: no patch in the bin)
    val_mean_gap: float | None
    val_var_gap: float | None  # mean over the bin's windows of |σ²_p − σ²| / σ²


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start positions of sliding windows along one axis, as MONAI's sliding window places them: a stride of
    patch × (1 − overlap), and a last window flush with the end."""
    if size <= patch:
        return [0]
    stride = max(1, int(patch * (1 - overlap)))
    starts = list(range(0, size - patch + 1, stride))
    return starts if starts[-1] == size - patch else [*starts, size - patch]


def validation_windows(volumes: list[Volume], patch: list[int], overlap: float):
    """(image, label) windows of every validation volume, shape (1, C, *patch) and (1, 1, *patch)."""
    for vol in volumes:
        image, label = vol.image, vol.label
        grids = [window_starts(s, p, overlap) for s, p in zip(image.shape[1:], patch)]
        for d in grids[0]:
            for h in grids[1]:
                for w in grids[2]:
                    box = (
                        slice(None),
                        slice(d, d + patch[0]),
                        slice(h, h + patch[1]),
                        slice(w, w + patch[2]),
                    )
                    yield image[box].unsqueeze(0), label[box].unsqueeze(0)


@torch.no_grad()
def measure(
    model: torch.nn.Module, layer: torch.nn.Module, device: torch.device, patches
) -> list[PatchStats]:
    """Per-patch statistics of `layer`'s input (as BatchNorm computes them at N = 1) for each (image, label)."""
    found: list[PatchStats] = []
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(batch_stats(args[0])))
    try:
        for image, label in patches:
            forward_until(model, image.to(device), layer)
            mean, var = seen.pop()
            found.append(PatchStats(float((label > 0).float().mean()), mean, var))
    finally:
        handle.remove()
    return found


def training_patches(volumes: list[Volume], data_cfg, seed: int):
    """TRAIN_PATCHES (image, label) patches at batch size 1, as training at batch size 1 draws them."""
    sampler = BatchSampler(
        volumes, OmegaConf.merge(data_cfg, {"batch_size": 1, "patches_per_volume": 1}), seed
    )
    for step in range(TRAIN_PATCHES):
        yield sampler.batch(step)


def content_rows(train: list[PatchStats], val: list[PatchStats]) -> list[ContentRow]:
    """One row per foreground-share bin, and one for all patches; σ and μ pooled over the training patches."""
    means = torch.stack([p.mean for p in train])
    pooled_mean = means.mean(0)
    pooled_var = torch.stack([p.var for p in train]).mean(0) + means.var(0, correction=0) + 1e-12

    def mean_gap(group: list[PatchStats]) -> float | None:
        gaps = [((p.mean - pooled_mean).abs() / pooled_var.sqrt()).mean().item() for p in group]
        return sum(gaps) / len(gaps) if gaps else None

    def var_gap(group: list[PatchStats]) -> float | None:
        gaps = [((p.var - pooled_var).abs() / pooled_var).mean().item() for p in group]
        return sum(gaps) / len(gaps) if gaps else None

    rows = []
    for label, lo, hi in (*BINS, ("all", -math.inf, math.inf)):
        t = [p for p in train if lo <= p.foreground < hi]
        v = [p for p in val if lo <= p.foreground < hi]
        rows.append(
            ContentRow(
                label, len(t) / len(train), len(v) / max(len(val), 1), mean_gap(t), mean_gap(v), var_gap(v)
            )
        )
    return rows
