"""What norm-exp-check measures on a trained network: every validation case scored with the running statistics
(model.eval()), with PreciseBN statistics recomputed on training patches, and with batch statistics; each
volume's statistics at every BatchNorm layer's input; and how the sliding window batched the windows, on which
the batch-statistics score depends. Scoring is the training's own (training/evaluate.py)."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from torch import nn

from norm_experiments.data.pipeline import DataBundle, Volume
from norm_experiments.diagnose.probe import Stats, bn_layers, gap, pre_hooks
from norm_experiments.norms import bn_eval_mode, recompute_bn_statistics
from norm_experiments.norms.bn_common import tracks_running_stats
from norm_experiments.norms.eval_modes import PopulationStats
from norm_experiments.training.evaluate import (
    Inference,
    ValResult,
    evaluate,
    precise_bn_draw,
    score_each_volume,
    summarize,
)


@dataclass
class WindowBatches:
    """How many windows each batch-statistics forward held: what "batch statistics" means for this check."""

    windows_per_forward: int  # the sw_batch_size the batch mode used
    sizes: Counter = field(default_factory=Counter)  # windows in a forward -> how many forwards

    @property
    def forwards(self) -> int:
        return sum(self.sizes.values())

    @property
    def single_window_forwards(self) -> int:
        return self.sizes.get(1, 0)


@dataclass
class Checked:
    """Everything the check prints, from which the verdict is computed."""

    scores: dict[str, ValResult]  # mode -> scores with per-case totals (running/precise/batch, or plain)
    class_names: list[str]  # foreground classes 1..K
    layer_gaps: dict[str, dict[str, dict[str, float]]]  # BN layer -> volume -> gap() row
    precise_patches: int
    windows: WindowBatches | None = None  # None without BatchNorm
    instance_layers: list[str] = field(default_factory=list)  # InstanceNorm layers with running statistics


def score(model: nn.Module, volumes: list[Volume], num_classes: int, inf: Inference, mode: str) -> ValResult:
    """Every volume's scores, with BatchNorm layers in `mode` (running | batch)."""
    with bn_eval_mode(model, mode):
        return evaluate(model, volumes, num_classes, inf.for_mode(mode), surface=True)


def score_batch_mode_with_stats(
    model: nn.Module, volumes: list[Volume], num_classes: int, inf: Inference, names: list[str]
) -> tuple[ValResult, dict[str, dict[str, Stats]], WindowBatches]:
    """Batch-statistics scores; each volume's statistics at each named BN layer's input, pooled over the
    volume's sliding windows (mean and unbiased variance per channel, normalizing as training did); and the
    number of windows in each forward."""
    inf = inf.for_mode("batch")
    windows = WindowBatches(inf.sw_batch_size)
    count = model.register_forward_pre_hook(lambda _m, args: windows.sizes.update([args[0].shape[0]]))
    per_volume, stats = [], {}
    try:
        with bn_eval_mode(model, "batch"):
            for vol in volumes:
                pooled = {name: PopulationStats() for name in names}
                with pre_hooks(model, names, lambda n, x, pooled=pooled: pooled[n].add(x)):
                    totals, _ = score_each_volume(model, [vol], num_classes, inf, surface=True)
                per_volume.append(totals)
                stats[vol.name] = {  # a layer inference never runs (e.g. a deep-supervision head) has none
                    n: (p.mean.float().cpu(), (p.m2 / max(p.count - 1, 1)).float().cpu())
                    for n, p in pooled.items()
                    if p.mean is not None
                }
    finally:
        count.remove()
    result = summarize(torch.cat(per_volume), surface=True, case_names=[v.name for v in volumes])
    return result, stats, windows


def precise_bn_batches(cfg: DictConfig, data: DataBundle) -> tuple[int, Iterator[torch.Tensor]]:
    """(patches, batches) for PreciseBN: training's own draw (evaluate.precise_bn_draw) for this config."""
    effective_batch = int(cfg.data.batch_size) * int(cfg.data.patches_per_volume)
    samples = int(cfg.trainer.precise_bn_samples)
    return precise_bn_draw(data.train, cfg.data, int(cfg.seed), samples, effective_batch)


def instance_running_layers(model: nn.Module) -> list[str]:
    """InstanceNorm layers that keep running statistics (norm.options.track_running_stats=true): model.eval()
    normalizes with their averages, where training normalized each window with its own statistics."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.instancenorm._InstanceNorm)
        and m.track_running_stats
        and m.running_mean is not None
    ]


@contextmanager
def own_statistics(model: nn.Module, names: list[str]) -> Iterator[None]:
    """The named InstanceNorm layers normalize each window with its own statistics, as in training, and leave
    their running statistics untouched: given its running buffers, F.instance_norm with input statistics would
    also update them, so the buffers are lent out for the duration."""
    layers = dict(model.named_modules())
    saved = {n: (layers[n].running_mean, layers[n].running_var, layers[n].track_running_stats) for n in names}
    try:
        for name in names:
            layer = layers[name]
            layer.running_mean, layer.running_var, layer.track_running_stats = None, None, False
        yield
    finally:
        for name, (running_mean, running_var, tracking) in saved.items():
            layer = layers[name]
            layer.running_mean, layer.running_var, layer.track_running_stats = (
                running_mean,
                running_var,
                tracking,
            )


def score_instance_modes(
    model: nn.Module, volumes: list[Volume], num_classes: int, inf: Inference, names: list[str]
) -> dict[str, ValResult]:
    """Scores as model.eval() runs the network (InstanceNorm's running statistics) and with each window's own."""
    scores = {"running": score(model, volumes, num_classes, inf, "running")}
    with own_statistics(model, names):
        scores["own"] = score(model, volumes, num_classes, inf, "running")
    return scores


def run_checks(
    model: nn.Module, cfg: DictConfig, data: DataBundle, inf: Inference
) -> tuple[Checked, nn.Module | None]:
    """All scores and statistics; returns the PreciseBN copy of the model too (None without BatchNorm)."""
    num_classes = len(data.info.labels)
    class_names = [data.info.labels[i] for i in sorted(data.info.labels) if i != 0]
    layers = {n: m for n, m in bn_layers(model).items() if tracks_running_stats(m)}
    if not layers:
        instance = instance_running_layers(model)
        if instance:
            scores = score_instance_modes(model, data.val, num_classes, inf, instance)
            return Checked(scores, class_names, {}, 0, instance_layers=instance), None
        plain = {"plain": score(model, data.val, num_classes, inf, "running")}
        return Checked(plain, class_names, {}, 0), None
    scores = {"running": score(model, data.val, num_classes, inf, "running")}
    patches, batches = precise_bn_batches(cfg, data)
    precise = copy.deepcopy(model)
    with inf.autocast():  # the statistics are seen under the precision that scores them
        recompute_bn_statistics(precise, batches, inf.device)
    scores["precise"] = score(precise, data.val, num_classes, inf, "running")
    scores["batch"], stats, windows = score_batch_mode_with_stats(
        model, data.val, num_classes, inf, list(layers)
    )
    gaps = {
        name: {vol: gap(per_layer[name], layer) for vol, per_layer in stats.items()}
        for name, layer in layers.items()
        if all(name in per_layer for per_layer in stats.values())
    }
    return Checked(scores, class_names, gaps, patches, windows), precise
