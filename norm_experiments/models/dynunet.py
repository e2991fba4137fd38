"""MONAI's DynUNet planned as nnU-Net plans a 3D full-resolution network, with any of our norms.

Planning (nnU-Net v1's get_pool_and_conv_props): starting from the patch size and the voxel spacing, each
level downsamples (stride 2) every axis whose size is still >= 8 and whose spacing is under twice the finest
spacing among those axes; the other axes keep stride 1 (a single axis left needs >= 12 voxels). The kernel
is 3 along axes under twice the finest spacing and 1 along axes still coarser (a 1x3x3 conv on thick
slices), 3 for good once it is 3, and 3x3x3 at the bottleneck. Planning stops when no axis may be
downsampled or after model.max_depth levels (nnU-Net caps poolings per axis instead). Channels: base_channels at
full resolution, doubled per level, capped at max_channels (nnU-Net: 32 and 320). Deep supervision is off:
the loss and the scores see the full-resolution output only, as for the other networks.

The norm layers come from MONAI's Norm factory under our registered names, as in model=basic_unet; the convs
before each norm are the norm's own (spec.conv: weight standardization, weight normalization, no bias
before a learnable shift), and a norm with its own activation (FRN's TLU) gets no LeakyReLU after it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from monai.networks.blocks.dynunet_block import UnetBasicBlock
from monai.networks.nets import DynUNet
from omegaconf import DictConfig
from torch import nn

from norm_experiments.errors import UserError
from norm_experiments.models import Level
from norm_experiments.norms import NormSpec, check_channels, register_monai_norms
from norm_experiments.norms.monai_registry import monai_name

ACTIVATION = ("leakyrelu", {"inplace": True, "negative_slope": 0.01})  # nnU-Net's and DynUNet's default
MIN_FEATURE_SIZE = 4  # nnU-Net: feature maps end no smaller than 4 voxels along a downsampled axis
MAX_SPACING_RATIO = 2.0  # an axis is downsampled only while its spacing is under 2x the finest


def plan(
    patch_size: Sequence[int], spacing: Sequence[float], max_depth: int
) -> tuple[list[list[int]], list[list[int]]]:
    """(kernel sizes, strides) per level, input block first, bottleneck last (DynUNet's arguments).

    nnU-Net v1's get_pool_and_conv_props, with a cap on levels rather than on poolings per axis."""
    sizes, spacings = [float(p) for p in patch_size], [float(s) for s in spacing]
    kernel = [1, 1, 1]  # once 3 along an axis, it stays 3
    kernels: list[list[int]] = []
    strides: list[list[int]] = [[1, 1, 1]]
    while len(strides) <= max_depth:
        axes = [a for a in range(3) if sizes[a] >= 2 * MIN_FEATURE_SIZE]
        if not axes:
            break
        finest = min(spacings[a] for a in axes)  # the finest of the axes that may still be halved
        axes = [a for a in axes if spacings[a] / finest < MAX_SPACING_RATIO]
        if not axes or (len(axes) == 1 and sizes[axes[0]] < 3 * MIN_FEATURE_SIZE):
            break
        kernel = [
            3 if k == 3 or s / min(spacings) < MAX_SPACING_RATIO else 1 for k, s in zip(kernel, spacings)
        ]
        kernels.append(kernel)
        strides.append([2 if a in axes else 1 for a in range(3)])
        for a in axes:
            sizes[a], spacings[a] = sizes[a] / 2, spacings[a] * 2
    kernels.append([3, 3, 3])
    return kernels, strides


def channels(model_cfg: DictConfig, levels: int) -> list[int]:
    base, cap = int(model_cfg.base_channels), int(model_cfg.max_channels)
    return [min(base * 2**i, cap) for i in range(levels)]


def planned(
    model_cfg: DictConfig, patch_size: Sequence[int], spacing: Sequence[float] | None
) -> tuple[list[list[int]], list[list[int]]]:
    """The plan for this patch and spacing (isotropic when unknown), refused with one line when DynUNet
    cannot take it: fewer than one downsampling, or a patch axis the strides do not divide."""
    spacing = list(spacing) if spacing is not None else [1.0, 1.0, 1.0]
    kernels, strides = plan(patch_size, spacing, int(model_cfg.max_depth))
    where = f"model=dynunet plans from data.patch_size={list(patch_size)} and spacing {_mm(spacing)}"
    if len(strides) < 3:  # DynUNet needs an input block, one downsampling block and a bottleneck
        raise UserError(
            f"{where}: fewer than two downsamplings (an axis is halved only while >= {2 * MIN_FEATURE_SIZE} "
            "voxels); use a data.patch_size of at least 16 along the finest axes"
        )
    divisor = [math.prod(s[axis] for s in strides) for axis in range(3)]
    if any(p % d for p, d in zip(patch_size, divisor)):
        fit = [math.ceil(p / d) * d for p, d in zip(patch_size, divisor)]
        raise UserError(f"{where}: its strides need sizes divisible by {divisor}; e.g. data.patch_size={fit}")
    return kernels, strides


def _mm(spacing: Sequence[float]) -> str:
    return "x".join(f"{s:g}" for s in spacing) + " mm"


def dynunet_levels(
    model_cfg: DictConfig, patch_size: Sequence[int], spacing: Sequence[float] | None
) -> list[Level]:
    """Levels of the planned network, full resolution first (for the pre-flight check)."""
    _, strides = planned(model_cfg, patch_size, spacing)
    divisor, levels = [1, 1, 1], []
    for stride, count in zip(strides, channels(model_cfg, len(strides))):
        divisor = [d * s for d, s in zip(divisor, stride)]
        levels.append(Level((divisor[0], divisor[1], divisor[2]), count))
    return levels


def dynunet(
    model_cfg: DictConfig,
    spec: NormSpec,
    in_channels: int,
    out_channels: int,
    spacing: Sequence[float] | None,
) -> nn.Module:
    """DynUNet for `model_cfg.patch_size`-sized windows of volumes with this spacing, every norm from spec."""
    register_monai_norms()
    patch_size = list(model_cfg.patch_size)
    kernels, strides = planned(model_cfg, patch_size, spacing)
    filters = channels(model_cfg, len(strides))
    check_channels(spec, filters)  # the spacing may give other levels than the pre-flight check assumed
    net = DynUNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernels,
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=filters,
        norm_name=(monai_name(spec.name), dict(spec.options)),
        act_name=ACTIVATION,
        deep_supervision=False,
        res_block=False,
    )
    for block in net.modules():
        if isinstance(block, UnetBasicBlock):
            block.conv1.conv = _norm_conv(spec, block.conv1.conv)
            block.conv2.conv = _norm_conv(spec, block.conv2.conv)
            if spec.includes_activation:
                block.lrelu = nn.Identity()
    net.apply(DynUNet.initialize_weights)  # DynUNet's He init, for the convs replaced above too
    return net


def _norm_conv(spec: NormSpec, old: nn.Conv3d) -> nn.Module:
    """The norm's own conv (bias only where the norm has no learnable shift) with `old`'s shape."""
    return spec.conv(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding)  # type: ignore[arg-type]
