"""Which statistics BN-family layers use at evaluation, and recomputing their running statistics (PreciseBN).

The batch-size-1 trap: in training, BatchNorm normalizes each volume with its own statistics; model.eval()
switches to running averages of those per-volume statistics, which the network never saw. Two fixes to
compare: evaluate with batch statistics (``bn_eval_mode(model, "batch")``), or recompute the running
statistics as population statistics after training (``recompute_bn_statistics``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from norm_experiments.errors import UserError
from norm_experiments.norms.bn_common import is_batch_stat_layer, reduce_dims, tracks_running_stats
from norm_experiments.norms.sync import PortableSyncBatchNorm, distributed_world_size

logger = logging.getLogger(__name__)

BN_EVAL_MODES = ("running", "batch")


@contextmanager
def bn_eval_mode(model: nn.Module, mode: str) -> Iterator[nn.Module]:
    """Evaluate `model` with BN-family layers using running statistics ("running": plain model.eval())
    or the current batch's statistics ("batch": BN layers normalize as in training but leave their
    running statistics untouched). Everything else (dropout...) is in eval mode. Every module's training
    flag and every BN layer's track_running_stats are restored on exit.
    """
    if mode not in BN_EVAL_MODES:
        raise UserError(f"BN eval mode must be one of {', '.join(BN_EVAL_MODES)}; got {mode!r}")
    training = {module: module.training for module in model.modules()}
    tracking = {m: m.track_running_stats for m in model.modules() if is_batch_stat_layer(m)}
    try:
        model.eval()
        if mode == "batch":
            for layer in tracking:
                # Train mode without tracking = batch statistics, no running-stat update (PyTorch's rule,
                # which our BN-family layers follow too).
                layer.train()
                layer.track_running_stats = False
        yield model
    finally:
        for module, was_training in training.items():
            module.training = was_training
        for layer, was_tracking in tracking.items():
            layer.track_running_stats = was_tracking


class PopulationStats:
    """Per-channel count, mean and sum of squared deviations of everything a layer saw, merged batch by
    batch (Chan et al.'s parallel update, in float64) so the result is the exact population statistic."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        n = x.numel() // x.shape[1]
        # Per-batch statistics in float32 (accurate within a batch), merged in float64 across batches.
        var, mean = torch.var_mean(x.detach().float(), dim=reduce_dims(x), correction=0)
        var, mean = var.double(), mean.double()
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, var * n
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + var * n + delta.pow(2) * (self.count * n / total)
        self.count = total

    def all_reduce(self, group) -> None:
        """Merge across the ranks of `group` (sync layers under DDP): sums of x and x² in float64."""
        if self.mean is None:
            return
        sums = torch.cat([self.mean.new_tensor([self.count]), self.mean * self.count])
        sums = torch.cat([sums, self.m2 + self.mean.pow(2) * self.count])
        torch.distributed.all_reduce(sums, group=group)
        channels = self.mean.numel()
        self.count = int(sums[0].item())
        total, total_sq = sums[1 : 1 + channels], sums[1 + channels :]
        self.mean = total / self.count
        self.m2 = total_sq - self.mean.pow(2) * self.count

    def write_to(self, layer: nn.Module, num_batches: int) -> None:
        layer.running_mean.copy_(self.mean)
        layer.running_var.copy_(self.m2 / max(self.count - 1, 1))  # unbiased, as BatchNorm stores it
        layer.num_batches_tracked.fill_(num_batches)


def recompute_bn_statistics(model: nn.Module, batches: Iterable[torch.Tensor], device) -> int:
    """PreciseBN: replace the running mean/var of every BN-family layer by the exact population statistics
    (mean and unbiased variance over all N x D x H x W values) of its inputs over `batches`.

    Each batch (an input tensor; the caller extracts it from a data dict) is run through the model as in
    ``bn_eval_mode(model, "batch")``: earlier BN layers normalize with the batch's statistics, as in
    training, while dropout is off, as at inference. Differences from torch.optim.swa_utils.update_bn:
    exact population variance (update_bn averages per-batch variances, missing the spread of batch means)
    and no dropout. Sync layers merge their statistics across ranks when a process group exists; then
    every rank must call this with the same number of batches. Returns the number of batches used.
    """
    layers = {name: m for name, m in model.named_modules() if tracks_running_stats(m)}
    if not layers:
        logger.info("recompute_bn_statistics: the model has no BN layer with running statistics")
        return 0
    stats = {name: PopulationStats() for name in layers}
    hooks = [
        layer.register_forward_pre_hook(lambda _m, args, s=stats[name]: s.add(args[0]))
        for name, layer in layers.items()
    ]
    num_batches = 0
    try:
        with bn_eval_mode(model, "batch"), torch.no_grad():
            for batch in batches:
                model(batch.to(device))
                num_batches += 1
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        for name, layer in layers.items():
            if isinstance(layer, PortableSyncBatchNorm) and distributed_world_size(layer.process_group) > 1:
                stats[name].all_reduce(layer.process_group)
            if stats[name].mean is not None:
                stats[name].write_to(layer, num_batches)
    return num_batches
