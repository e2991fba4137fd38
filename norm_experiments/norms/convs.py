"""The convolution placed before a norm: plain, or a norm's own (weight-standardized, weight-normalized)."""

from __future__ import annotations

from torch import nn


def plain_conv(
    in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int, bias: bool
) -> nn.Module:
    return nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
