"""Our compact 3D U-Net (models/unet.py)."""

from __future__ import annotations

from norm_experiments.models.registry import ModelRecord, register


def build(model_cfg, spec, in_ch: int, out_ch: int, spacing=None):
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


def levels(model_cfg, patch_size=None, spacing=None):
    from norm_experiments.models import halving_levels
    from norm_experiments.models.unet import level_channels

    depth = int(model_cfg.depth)
    channels = level_channels(
        int(model_cfg.base_channels), depth, float(model_cfg.growth), int(model_cfg.max_channels)
    )
    return halving_levels(depth, channels)


register(ModelRecord("unet", "our compact 3D U-Net", build=f"{__name__}:build", levels=f"{__name__}:levels"))
