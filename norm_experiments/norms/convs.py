"""The convolution placed before a norm: plain, or a norm's own (weight-standardized, weight-normalized)."""

from __future__ import annotations

from torch import nn

from norm_experiments.norms.cpu_conv import CpuConv3d


def plain_conv(
    in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int, bias: bool
) -> nn.Module:
    """A Conv3d (a CpuConv3d: the same conv, with a faster path for one sample on a CPU, see cpu_conv.py)."""
    return CpuConv3d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
