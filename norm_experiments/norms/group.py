"""GroupNorm (statistics per sample over (C/G) x D x H x W) and "layer", GroupNorm with one group.

"layer" normalizes over C x D x H x W per sample: the conv-net layer norm, not nnU-Net's LayerNormNd (which
normalizes over C at each voxel). Both are independent of the batch.
"""

from __future__ import annotations

from torch import nn

from norm_experiments.errors import UserError
from norm_experiments.norms.options import Option, count, eps, option_key
from norm_experiments.norms.registry import NormRecord, register


def divisors(number: int) -> list[int]:
    return [d for d in range(1, number + 1) if number % d == 0]


def group_norm(channels: int, o: dict) -> nn.Module:
    # GroupNorm's own error ("num_channels must be divisible by num_groups") names no config key.
    if channels % o["num_groups"]:
        raise UserError(
            f"{option_key('num_groups')}={o['num_groups']} does not divide {channels} channels; "
            f"choose a divisor of {channels}: {', '.join(map(str, divisors(channels)))}"
        )
    return nn.GroupNorm(o["num_groups"], channels, eps=o["eps"])


GROUP = register(
    NormRecord(
        name="group",
        summary="(C/G)×D×H×W per sample",
        build=group_norm,
        options={"num_groups": Option(4, count), "eps": eps()},
        groups_option="num_groups",
        spellings=("groupnorm", "gn"),
    )
)

LAYER = register(
    NormRecord(
        name="layer",
        summary="C×D×H×W per sample (GroupNorm with one group)",
        build=lambda channels, o: nn.GroupNorm(1, channels, eps=o["eps"]),
        options={"eps": eps()},
        spellings=("layernorm", "ln"),
    )
)
