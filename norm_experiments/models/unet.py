"""A compact 3D U-Net whose every normalization comes from one NormSpec.

Blocks are ConvNormAct (conv -> norm -> activation), as in nnU-Net's dynamic-network-architectures: the norm
and the conv both come from the spec, so weight standardization / weight norm swap the conv too, and the conv
has no bias when the norm adds a learnable shift. The output layer is a plain 1x1x1 conv with no norm (MONAI's
UNet normalizes its output-side layers, where GroupNorm with more groups than output channels fails).
"""

from __future__ import annotations

import torch
from torch import nn

from norm_experiments.norms import NormSpec
from norm_experiments.norms.cpu_conv import CpuConv3d


class ConvNormAct(nn.Sequential):
    """conv -> norm -> LeakyReLU (the activation is skipped when the norm carries its own, as FRN's TLU)."""

    def __init__(self, spec: NormSpec, in_channels: int, out_channels: int, stride: int = 1) -> None:
        act = nn.Identity() if spec.includes_activation else nn.LeakyReLU(0.01, inplace=True)
        super().__init__(spec.conv(in_channels, out_channels, 3, stride), spec.norm(out_channels), act)


class DoubleConv(nn.Sequential):
    """Two ConvNormAct blocks; the first may downsample with a strided conv (no pooling, as in nnU-Net)."""

    def __init__(self, spec: NormSpec, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(
            ConvNormAct(spec, in_channels, out_channels, stride),
            ConvNormAct(spec, out_channels, out_channels),
        )


def level_channels(base_channels: int, depth: int, growth: float, max_channels: int) -> list[int]:
    """Channel count of each resolution level, from full resolution (level 0) to the bottleneck."""
    return [min(int(round(base_channels * growth**level)), max_channels) for level in range(depth + 1)]


class UNet3D(nn.Module):
    """Encoder x0..x_depth (stride-2 convs), decoder with transposed convs and skip concatenation."""

    def __init__(
        self,
        spec: NormSpec,
        in_channels: int,
        out_channels: int,
        depth: int = 3,
        base_channels: int = 8,
        growth: float = 2.0,
        max_channels: int = 320,
    ) -> None:
        super().__init__()
        self.channels = level_channels(base_channels, depth, growth, max_channels)
        ch = self.channels
        self.encoder = nn.ModuleList([DoubleConv(spec, in_channels, ch[0])])
        self.encoder.extend(DoubleConv(spec, ch[i - 1], ch[i], stride=2) for i in range(1, depth + 1))
        self.upsample = nn.ModuleList(
            nn.ConvTranspose3d(ch[i + 1], ch[i], kernel_size=2, stride=2) for i in range(depth)
        )
        self.decoder = nn.ModuleList(DoubleConv(spec, 2 * ch[i], ch[i]) for i in range(depth))
        self.head = CpuConv3d(ch[0], out_channels, kernel_size=1)

    @property
    def downsampling_factor(self) -> int:
        """Input sizes must be divisible by this (each level halves every spatial size)."""
        return 2 ** (len(self.channels) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        x = skips.pop()  # bottleneck
        for level in reversed(range(len(self.decoder))):
            x = self.upsample[level](x)
            x = self.decoder[level](torch.cat([x, skips.pop()], dim=1))
        return self.head(x)
