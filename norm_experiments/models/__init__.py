"""Model factory: our UNet3D or a MONAI network, every norm from the same NormSpec."""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from norm_experiments.errors import UserError
from norm_experiments.models.unet import UNet3D
from norm_experiments.norms import NormSpec

MODEL_NAMES = ("unet", "basic_unet")


def build_model(model_cfg: DictConfig, spec: NormSpec, in_channels: int, out_channels: int) -> nn.Module:
    if model_cfg.name == "unet":
        return UNet3D(
            spec,
            in_channels,
            out_channels,
            depth=int(model_cfg.depth),
            base_channels=int(model_cfg.base_channels),
            growth=float(model_cfg.growth),
            max_channels=int(model_cfg.max_channels),
        )
    if model_cfg.name == "basic_unet":
        from norm_experiments.models.basic_unet import basic_unet

        return basic_unet(model_cfg, spec, in_channels, out_channels)
    raise UserError(f"model.name: unknown model {model_cfg.name!r}; valid: {', '.join(MODEL_NAMES)}")


def level_layout(model_cfg: DictConfig) -> tuple[int, list[int]]:
    """(downsampling steps, channels per level) of the configured network, for pre-flight checks."""
    if model_cfg.name == "unet":
        from norm_experiments.models.unet import level_channels

        channels = level_channels(
            int(model_cfg.base_channels),
            int(model_cfg.depth),
            float(model_cfg.growth),
            int(model_cfg.max_channels),
        )
        return int(model_cfg.depth), channels
    features = list(model_cfg.features)
    return 4, features[:5]
