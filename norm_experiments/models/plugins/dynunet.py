"""MONAI's DynUNet planned as nnU-Net plans its 3d_fullres network (models/dynunet.py)."""

from __future__ import annotations

from norm_experiments.models.registry import ModelRecord, register


def build(model_cfg, spec, in_ch: int, out_ch: int, spacing=None):
    from norm_experiments.models.dynunet import dynunet

    return dynunet(model_cfg, spec, in_ch, out_ch, spacing)


def levels(model_cfg, patch_size, spacing=None):
    from norm_experiments.models.dynunet import dynunet_levels

    return dynunet_levels(model_cfg, patch_size, spacing)


register(
    ModelRecord(
        "dynunet",
        "MONAI's DynUNet planned as nnU-Net's 3d_fullres",
        build=f"{__name__}:build",
        levels=f"{__name__}:levels",
    )
)
