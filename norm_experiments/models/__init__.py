"""Model registry: each network the project trains, and the level layout its pre-flight check reads.

One dict from `model.name` to a ModelEntry is the whole registry; build_model, the pre-flight check and the
config's valid names all ask it. Every network builds every norm from the same NormSpec.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from omegaconf import DictConfig
from torch import nn

from norm_experiments.errors import UserError
from norm_experiments.norms import NormSpec


@dataclass(frozen=True)
class Level:
    """One resolution level: how much each axis has been downsampled (the product of the strides so far,
    per axis) and how many channels its feature maps have."""

    divisor: tuple[int, int, int]
    channels: int


# (model config, patch size, spacing in mm or None) -> the levels from full resolution to the bottleneck
Layout = Callable[[DictConfig, Sequence[int], Sequence[float] | None], list[Level]]
# (model config, norm, in channels, out channels, spacing or None) -> the network
Builder = Callable[[DictConfig, NormSpec, int, int, Sequence[float] | None], nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    build: Builder
    levels: Layout
    summary: str


def _halving_levels(depth: int, channels: Sequence[int]) -> list[Level]:
    """Every axis halved at each level (our U-Net, BasicUNet)."""
    return [Level((2**i, 2**i, 2**i), int(channels[i])) for i in range(depth + 1)]


def _unet(model_cfg: DictConfig, spec: NormSpec, in_ch: int, out_ch: int, spacing=None) -> nn.Module:
    from norm_experiments.models.unet import UNet3D

    return UNet3D(
        spec,
        in_ch,
        out_ch,
        depth=int(model_cfg.depth),
        base_channels=int(model_cfg.base_channels),
        growth=float(model_cfg.growth),
        max_channels=int(model_cfg.max_channels),
    )


def _unet_levels(model_cfg: DictConfig, patch_size=None, spacing=None) -> list[Level]:
    from norm_experiments.models.unet import level_channels

    depth = int(model_cfg.depth)
    channels = level_channels(
        int(model_cfg.base_channels), depth, float(model_cfg.growth), int(model_cfg.max_channels)
    )
    return _halving_levels(depth, channels)


def _basic_unet(model_cfg: DictConfig, spec: NormSpec, in_ch: int, out_ch: int, spacing=None) -> nn.Module:
    from norm_experiments.models.basic_unet import basic_unet

    return basic_unet(model_cfg, spec, in_ch, out_ch)


def _basic_unet_levels(model_cfg: DictConfig, patch_size=None, spacing=None) -> list[Level]:
    return _halving_levels(4, list(model_cfg.features)[:5])


def _dynunet(model_cfg: DictConfig, spec: NormSpec, in_ch: int, out_ch: int, spacing=None) -> nn.Module:
    from norm_experiments.models.dynunet import dynunet

    return dynunet(model_cfg, spec, in_ch, out_ch, spacing)


def _dynunet_levels(model_cfg: DictConfig, patch_size, spacing=None) -> list[Level]:
    from norm_experiments.models.dynunet import dynunet_levels

    return dynunet_levels(model_cfg, patch_size, spacing)


MODELS: dict[str, ModelEntry] = {
    "unet": ModelEntry(_unet, _unet_levels, "our compact 3D U-Net"),
    "basic_unet": ModelEntry(_basic_unet, _basic_unet_levels, "MONAI's BasicUNet"),
    "dynunet": ModelEntry(_dynunet, _dynunet_levels, "MONAI's DynUNet planned as nnU-Net's 3d_fullres"),
}
MODEL_NAMES = tuple(MODELS)


def entry(name: object) -> ModelEntry:
    if name not in MODELS:
        raise UserError(f"model.name: unknown model {name!r}; valid: {', '.join(MODEL_NAMES)}")
    return MODELS[str(name)]


def build_model(
    model_cfg: DictConfig,
    spec: NormSpec,
    in_channels: int,
    out_channels: int,
    spacing: Sequence[float] | None = None,
) -> nn.Module:
    """The configured network with every norm from `spec`. `spacing` (mm per voxel of the preprocessed
    volumes) is what DynUNet plans its kernels and strides from; the other networks ignore it."""
    return entry(model_cfg.name).build(model_cfg, spec, in_channels, out_channels, spacing)


def model_levels(
    model_cfg: DictConfig, patch_size: Sequence[int], spacing: Sequence[float] | None = None
) -> list[Level]:
    """The configured network's levels for this patch size, full resolution first, bottleneck last."""
    return entry(model_cfg.name).levels(model_cfg, patch_size, spacing)


def median_spacing(volumes: Sequence) -> list[float]:
    """Median voxel spacing (mm, per axis) of preprocessed volumes (anything with a `spacing`): what nnU-Net
    plans its network from."""
    import statistics

    return [float(statistics.median(axis)) for axis in zip(*(v.spacing for v in volumes))]
