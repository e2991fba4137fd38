"""SyncBatchNorm that also works on CPU and in a single process.

torch.nn.SyncBatchNorm synchronizes batch statistics across the ranks of a process group, but its forward
raises for CPU tensors once a process group exists. PortableSyncBatchNorm keeps torch's implementation for
accelerator tensors and adds a CPU path (gloo): global mean and variance from autograd-aware all_reduces
of per-rank counts, sums and squared deviations, so gradients flow across ranks as for one joined batch.
Without a process group of more than one rank it is exactly BatchNorm (and says so once in the log).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from norm_experiments.norms.bn_common import channel_view, reduce_dims, update_running_stats
from norm_experiments.norms.options import eps, running_momentum
from norm_experiments.norms.registry import NormRecord, register

logger = logging.getLogger(__name__)

_single_process_logged = False


def distributed_world_size(group: dist.ProcessGroup | None = None) -> int:
    """World size of `group` (default: the global group), 1 when torch.distributed is not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group or dist.group.WORLD)


def _log_single_process_once() -> None:
    global _single_process_logged
    if not _single_process_logged and not (dist.is_available() and dist.is_initialized()):
        _single_process_logged = True
        logger.info("syncbatch: no process group with more than one rank; behaving exactly as BatchNorm")


class _SumAcrossRanks(torch.autograd.Function):
    """all_reduce(SUM) with gradient: d(sum)/d(local) is 1, so each rank's gradient is the all-reduced
    upstream gradient. (torch.distributed.nn.functional.all_reduce does the same but is deprecated in
    recent torch and warns on every use.)"""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        summed = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
        return summed

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad_output.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum of `tensor` over the ranks of `group`, differentiable."""
    return _SumAcrossRanks.apply(tensor, group)


class PortableSyncBatchNorm(nn.SyncBatchNorm):
    """SyncBatchNorm for (N, C, *spatial) input on CUDA (torch's kernels) and CPU (all_reduce of sums)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            # Eval: running statistics, nothing to synchronize (torch does the same).
            return nn.modules.batchnorm._BatchNorm.forward(self, x)
        if distributed_world_size(self.process_group) == 1:
            _log_single_process_once()
            return nn.modules.batchnorm._BatchNorm.forward(self, x)
        if x.device.type != "cpu":
            return super().forward(x)
        return self._cpu_sync_forward(x)

    def _cpu_sync_forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.process_group or dist.group.WORLD
        dims = reduce_dims(x)
        # Two rounds (sum, then squared deviations from the global mean): as exact as a local
        # two-pass variance, unlike the sum-of-squares shortcut.
        local_count = torch.full((1,), x.numel() // x.shape[1], dtype=x.dtype, device=x.device)
        sums = all_reduce_sum(torch.cat([local_count, x.sum(dim=dims)]), group)
        count, mean = sums[0], sums[1:] / sums[0]
        centered = x - channel_view(mean, x)
        var = all_reduce_sum(centered.pow(2).sum(dim=dims), group) / count
        y = centered * channel_view(torch.rsqrt(var + self.eps), x)
        if self.affine:
            y = y * channel_view(self.weight, x) + channel_view(self.bias, x)
        if self.track_running_stats:
            update_running_stats(self, mean, var, int(count.item()))
        return y


RECORD = register(
    NormRecord(
        name="syncbatch",
        summary="N×D×H×W across all DDP ranks (single process: as batch)",
        build=lambda c, o: PortableSyncBatchNorm(c, eps=o["eps"], momentum=o["momentum"]),
        options={"eps": eps(), "momentum": running_momentum()},
        batch_dependent=True,
        bn_family=True,
        syncs_ranks=True,
        statistic_batch=lambda rank_patches, all_patches, o: all_patches,
        spellings=("syncbatchnorm", "syncbn"),
    )
)
