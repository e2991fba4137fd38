"""Make our norms available to MONAI networks (BasicUNet, DynUNet, SegResNet...) by name.

MONAI builds norm layers with ``get_norm_layer(("name", {...}), spatial_dims, channels)``: it looks up
``Norm["name", spatial_dims]`` (case-insensitive) and calls the result with the options plus
``num_features=channels`` or ``num_channels=channels`` when the callable accepts those keywords.

Which implementation a MONAI net gets for each of our names:

==============  =====================================================================================
name            under MONAI's Norm factory
==============  =====================================================================================
batch           MONAI's (nn.BatchNormNd): same as ours.
instance        MONAI's (nn.InstanceNormNd) - note its default affine=False; ours defaults to affine=True,
                so pass ``("instance", {"affine": True})`` to match.
group           MONAI's (nn.GroupNorm): same as ours; pass num_groups, e.g. ``("group", {"num_groups": 8})``.
layer           MONAI's is nn.LayerNorm (different). Our "layer" is ``("group", {"num_groups": 1})``.
syncbatch       MONAI's (nn.SyncBatchNorm): same on GPU; ours (PortableSyncBatchNorm) also runs on CPU/gloo
                and is what NormSpec builds.
none            ours: nn.Identity.
batchrenorm     ours: BatchRenorm (options as in configs/norm/batchrenorm.yaml).
ghostbatch      ours: GhostBatchNorm (option virtual_batch).
frn             ours: FilterResponseNorm with TLU; MONAI adds its own activation after it, so pass
                ``act=None`` (or accept the extra activation).
ws_group        ours, activation-norm part only: nn.GroupNorm(num_groups). MONAI builds its own plain
                convs, so the weight standardization is missing in MONAI nets.
weightnorm      ours, activation-norm part only: nn.Identity. The weight-normalized conv is missing in
                MONAI nets (they become "none" with conv bias).
==============  =====================================================================================

Existing MONAI names are never replaced: other code in the process may rely on them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from norm_experiments.norms.factory import NormSpec
from norm_experiments.norms.options import NORM_NAMES


def _layer_builder(name: str) -> Callable[..., nn.Module]:
    """A callable MONAI can instantiate: num_features from get_norm_layer, the rest are our options."""

    def build(num_features: int, **options: Any) -> nn.Module:
        return NormSpec(name, options).norm(num_features)

    build.__doc__ = f"Norm '{name}' from norm_experiments.norms (see its monai_registry module)."
    return build


def register_monai_norms() -> None:
    """Add every name of NORM_NAMES that MONAI's Norm factory lacks (idempotent; MONAI's names kept)."""
    from monai.networks.layers.factories import Norm

    for name in NORM_NAMES:
        if name.upper() in Norm.components:
            continue
        builder = _layer_builder(name)
        # The factory is called with spatial_dims; our layers work for any number of spatial dims
        # (ws_group/weightnorm/none are GroupNorm/Identity), so it is ignored.
        Norm.add_factory_callable(name, lambda _dims=None, builder=builder: builder, builder.__doc__)
