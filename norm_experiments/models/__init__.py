"""The networks the project trains: each is a record of the model registry (models/registry.py, one plug-in
module per network in models/plugins/), and build_model, the pre-flight check and the config's valid names
all ask it. Every network builds every norm from the same NormSpec. This package imports no torch: a record
names its network's code by import path, imported when the network is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from norm_experiments.plugins import resolve

if TYPE_CHECKING:
    from torch import nn

    from norm_experiments.models.registry import ModelRecord
    from norm_experiments.norms import NormSpec


@dataclass(frozen=True)
class Level:
    """One resolution level: how much each axis has been downsampled (the product of the strides so far,
    per axis) and how many channels its feature maps have."""

    divisor: tuple[int, int, int]
    channels: int


def halving_levels(depth: int, channels: Sequence[int]) -> list[Level]:
    """Every axis halved at each level (our U-Net, BasicUNet)."""
    return [Level((2**i, 2**i, 2**i), int(channels[i])) for i in range(depth + 1)]


def entry(name: object) -> ModelRecord:
    """The registered model `name` (UserError naming model.name and the valid names otherwise)."""
    from norm_experiments.models import registry

    return registry.get(name)


def build_model(
    model_cfg: DictConfig,
    spec: NormSpec,
    in_channels: int,
    out_channels: int,
    spacing: Sequence[float] | None = None,
) -> nn.Module:
    """The configured network with every norm from `spec`. `spacing` (mm per voxel of the preprocessed
    volumes) is what DynUNet plans its kernels and strides from; the other networks ignore it."""
    return resolve(entry(model_cfg.name).build)(model_cfg, spec, in_channels, out_channels, spacing)


def model_levels(
    model_cfg: DictConfig, patch_size: Sequence[int], spacing: Sequence[float] | None = None
) -> list[Level]:
    """The configured network's levels for this patch size, full resolution first, bottleneck last."""
    return resolve(entry(model_cfg.name).levels)(model_cfg, patch_size, spacing)


def median_spacing(volumes: Sequence) -> list[float]:
    """Median voxel spacing (mm, per axis) of preprocessed volumes (anything with a `spacing`): what nnU-Net
    plans its network from."""
    import statistics

    return [float(statistics.median(axis)) for axis in zip(*(v.spacing for v in volumes))]
