"""MONAI's BasicUNet with any of our norms, built exactly as our U-Net builds them.

The norm layers come from MONAI's Norm factory under our registered name (norms/monai_registry.py), so
"layer" is GroupNorm with one group (not MONAI's nn.LayerNorm) and "instance" has our options. What a norm
name cannot reach is fixed here: convs keep their bias only where the norm has no learnable shift; a norm
that brings its own activation (FRN's TLU) gets no second one; and norms with their own conv (weight
standardization, weight normalization) get it in place of MONAI's conv in every conv-norm block.
"""

from __future__ import annotations

from monai.networks.blocks import Convolution
from monai.networks.nets import BasicUNet
from omegaconf import DictConfig
from torch import nn

from norm_experiments.norms import NormSpec, register_monai_norms
from norm_experiments.norms.convs import plain_conv
from norm_experiments.norms.monai_registry import monai_name

ACTIVATION = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True})  # BasicUNet's default


def basic_unet(model_cfg: DictConfig, spec: NormSpec, in_channels: int, out_channels: int) -> nn.Module:
    register_monai_norms()
    net = BasicUNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        features=tuple(model_cfg.features),
        act=None if spec.includes_activation else ACTIVATION,  # type: ignore[arg-type]
        norm=(monai_name(spec.name), dict(spec.options)),
        bias=not spec.has_learnable_shift,
    )
    if spec.record.conv is not plain_conv:
        use_norm_convs(net, spec)
    return net


def use_norm_convs(net: nn.Module, spec: NormSpec) -> None:
    """Replace the conv of every MONAI conv-norm block by the norm's own conv, with the same shape."""
    for block in net.modules():
        if isinstance(block, Convolution) and isinstance(block.conv, nn.Conv3d):
            old = block.conv
            block.conv = spec.conv(
                old.in_channels, old.out_channels, old.kernel_size[0], old.stride[0], old.padding[0]
            )
