"""MONAI's BasicUNet with our norms (models/basic_unet.py)."""

from __future__ import annotations

from norm_experiments.models.registry import ModelRecord, register


def build(model_cfg, spec, in_ch: int, out_ch: int, spacing=None):
    from norm_experiments.models.basic_unet import basic_unet

    return basic_unet(model_cfg, spec, in_ch, out_ch)


def levels(model_cfg, patch_size=None, spacing=None):
    from norm_experiments.models import halving_levels

    return halving_levels(4, list(model_cfg.features)[:5])


register(
    ModelRecord("basic_unet", "MONAI's BasicUNet", build=f"{__name__}:build", levels=f"{__name__}:levels")
)
