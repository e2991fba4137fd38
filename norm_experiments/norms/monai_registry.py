"""Make our norms available to MONAI networks (BasicUNet, DynUNet, SegResNet...) by name.

MONAI builds norm layers with ``get_norm_layer(("name", {...}), spatial_dims, channels)``: it looks up
``Norm["name", spatial_dims]`` (case-insensitive) and calls the result with the options plus
``num_features=channels`` or ``num_channels=channels`` when the callable accepts those keywords.

Every registered norm is added under ``monai_name(name)`` ("norm_experiments_group", ...): that name always
builds exactly the layer our U-Net builds (model=basic_unet uses it). It is also added under its own name
where MONAI has no norm of that name (``("frn", {})``, ``("batchrenorm", {...})``...). MONAI's own names are
never replaced, and mean MONAI's layers: its "layer" is nn.LayerNorm (ours is GroupNorm with one group), its
"instance" has affine=False by default (ours True), its "syncbatch" is nn.SyncBatchNorm (ours also runs on
CPU/gloo). ws_group and weightnorm change the conv, which a norm name cannot reach: models.build_model
replaces MONAI's convs for them (models/basic_unet.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from norm_experiments.norms import registry
from norm_experiments.norms.factory import NormSpec

PREFIX = "norm_experiments_"


def monai_name(name: str) -> str:
    """The name under which MONAI's Norm factory builds exactly our norm `name`."""
    return f"{PREFIX}{name}"


def _layer_builder(name: str) -> Callable[..., nn.Module]:
    """A callable MONAI can instantiate: num_features from get_norm_layer, the rest are our options."""

    def build(num_features: int, **options: Any) -> nn.Module:
        return NormSpec(name, options).norm(num_features)

    build.__doc__ = f"Norm '{name}' from norm_experiments.norms (see its monai_registry module)."
    return build


def register_monai_norms() -> None:
    """Add every registered norm to MONAI's Norm factory (idempotent; MONAI's own names kept)."""
    from monai.networks.layers.factories import Norm

    for name in registry.names():
        builder = _layer_builder(name)
        for key in (monai_name(name), name):
            if key.upper() in Norm.components:
                continue
            # The factory is called with spatial_dims; our layers are built for 3D volumes and ignore it.
            Norm.add_factory_callable(key, lambda _dims=None, builder=builder: builder, builder.__doc__)
