"""What every BatchNorm-family layer here shares: how to recognize one, and PyTorch's running-stat rules.

Our BatchRenorm, GhostBatchNorm and PortableSyncBatchNorm subclass PyTorch's ``_BatchNorm``: they keep its
parameters, buffers and state-dict keys, so torch utilities (``torch.optim.swa_utils.update_bn``, DDP buffer
broadcast) and our eval-mode helpers treat them like BatchNorm3d.

Caveat: ``nn.SyncBatchNorm.convert_sync_batchnorm`` also converts our layers (they are ``_BatchNorm``s) into
plain SyncBatchNorm, dropping renorm/ghost behaviour; use norm=syncbatch instead of converting.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def is_batch_stat_layer(module: nn.Module) -> bool:
    """True for layers that normalize with batch statistics in training and running averages in eval.

    Covers torch BatchNorm1d/2d/3d and SyncBatchNorm and our BatchRenorm, GhostBatchNorm and
    PortableSyncBatchNorm. InstanceNorm (even with track_running_stats) is not included.
    """
    return isinstance(module, _BatchNorm)


def tracks_running_stats(module: nn.Module) -> bool:
    """True for a BN-family layer that has running statistics buffers to use in eval mode."""
    return is_batch_stat_layer(module) and module.track_running_stats and module.running_mean is not None


def reduce_dims(x: torch.Tensor) -> list[int]:
    """All axes but the channel axis (1): BatchNorm's reduction for (N, C, *spatial) input."""
    return [0, *range(2, x.dim())]


def channel_view(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape per-channel values (C,) to broadcast against x of shape (N, C, *spatial)."""
    return values.view(1, -1, *([1] * (x.dim() - 2)))


def running_update_factor(module: _BatchNorm) -> float:
    """Count one more training batch and return the weight of its statistics in the running average.

    Same rule as ``_BatchNorm.forward``: ``momentum``, or 1/num_batches when momentum is None
    (cumulative average). Call only in training mode with track_running_stats.
    """
    module.num_batches_tracked.add_(1)
    if module.momentum is None:
        return 1.0 / float(module.num_batches_tracked)
    return module.momentum


def update_running_stats(
    module: _BatchNorm, mean: torch.Tensor, biased_var: torch.Tensor, count: int
) -> None:
    """Move running mean/var towards this batch's statistics as BatchNorm does (unbiased variance)."""
    factor = running_update_factor(module)
    unbiased_var = biased_var * (count / max(count - 1, 1))
    with torch.no_grad():
        module.running_mean.lerp_(mean.detach().to(module.running_mean.dtype), factor)
        module.running_var.lerp_(unbiased_var.detach().to(module.running_var.dtype), factor)
