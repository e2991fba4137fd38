"""Weight Standardization (Qiao et al. 2019): each conv filter is standardized in every forward.

Every output filter's weight (in_channels x k x k x k values) is shifted to zero mean and scaled to unit
variance before the convolution; the stored parameter stays unconstrained. Used with GroupNorm (ws_group).
"""

from __future__ import annotations

import torch
from torch import nn

from norm_experiments.norms.cpu_conv import CpuConv3d
from norm_experiments.norms.group import group_norm
from norm_experiments.norms.options import Option, count, eps
from norm_experiments.norms.registry import NormRecord, register

# Added to the filter variance. Small enough that standardized filters have unit variance to ~1e-4 for
# default-initialized 3D filters (variance ~1e-4..1e-3), large enough to avoid 0/0 for a constant filter.
WS_EPS = 1e-8


def standardize_filters(weight: torch.Tensor, eps: float = WS_EPS) -> torch.Tensor:
    """(w - mean) / sqrt(var + eps) per output filter (dim 0), statistics over all other dims."""
    dims = list(range(1, weight.dim()))
    var, mean = torch.var_mean(weight, dim=dims, keepdim=True, correction=0)
    return (weight - mean) / torch.sqrt(var + eps)


class WSConv3d(CpuConv3d):
    """Conv3d whose filters are weight-standardized in forward (same arguments as nn.Conv3d); the
    standardized weight goes through CpuConv3d's batch-1 CPU path like any other conv's."""

    def standardized_weight(self) -> torch.Tensor:
        return standardize_filters(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)


def weight_standardized_conv(
    in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int, bias: bool
) -> nn.Module:
    return WSConv3d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)


RECORD = register(
    NormRecord(
        name="ws_group",
        summary="as group, after weight-standardized convs",
        build=group_norm,
        options={"num_groups": Option(4, count), "eps": eps()},
        conv=weight_standardized_conv,
        groups_option="num_groups",
        spellings=("wsgn", "gnws", "weightstandardization"),
    )
)
