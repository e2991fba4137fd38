"""Normalization layers under study and the tools to evaluate them fairly at batch sizes 1-8.

Entry point: ``spec = make_norm_spec(cfg.norm.name, **cfg.norm.options)``; a block is
``spec.conv(c_in, c_out)`` -> ``spec.norm(c_out)`` -> activation (skipped when spec.includes_activation).
What each norm is (batch-dependent? running statistics? its options...) is its record in ``registry``.
"""

from norm_experiments.norms.batchrenorm import (
    BatchRenorm,
    RenormSchedule,
    renorm_diagnostics,
    renorm_layers,
    set_renorm_progress,
)
from norm_experiments.norms.bn_common import is_batch_stat_layer
from norm_experiments.norms.cpu_conv import CpuConv3d, set_cpu_conv
from norm_experiments.norms.eval_modes import BN_EVAL_MODES, bn_eval_mode, recompute_bn_statistics
from norm_experiments.norms.factory import NormSpec, check_channels, make_norm_spec
from norm_experiments.norms.frn import FilterResponseNorm
from norm_experiments.norms.ghost import GhostBatchNorm
from norm_experiments.norms.monai_registry import register_monai_norms
from norm_experiments.norms.monitor import BNStatMonitor
from norm_experiments.norms.registry import NormRecord
from norm_experiments.norms.sync import PortableSyncBatchNorm
from norm_experiments.norms.weight_std import WSConv3d

__all__ = [
    "BN_EVAL_MODES",
    "BNStatMonitor",
    "BatchRenorm",
    "CpuConv3d",
    "FilterResponseNorm",
    "GhostBatchNorm",
    "NormRecord",
    "NormSpec",
    "PortableSyncBatchNorm",
    "RenormSchedule",
    "WSConv3d",
    "bn_eval_mode",
    "check_channels",
    "is_batch_stat_layer",
    "make_norm_spec",
    "recompute_bn_statistics",
    "register_monai_norms",
    "renorm_diagnostics",
    "renorm_layers",
    "set_cpu_conv",
    "set_renorm_progress",
]
