"""NormSpec: one normalization choice from the config, and the layers (norm and conv) it builds.

A U-Net block built from a spec is ``spec.conv(c_in, c_out)`` -> ``spec.norm(c_out)`` -> activation,
where the activation is skipped when ``spec.includes_activation`` (FRN brings its own TLU).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import reduce
from typing import Any

from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from norm_experiments.errors import UserError
from norm_experiments.norms.batchrenorm import make_batch_renorm
from norm_experiments.norms.cpu_conv import CpuConv3d
from norm_experiments.norms.frn import FilterResponseNorm
from norm_experiments.norms.ghost import GhostBatchNorm
from norm_experiments.norms.options import BATCH_STAT_NORMS, check_norm_name, option_key, resolve_options
from norm_experiments.norms.sync import PortableSyncBatchNorm
from norm_experiments.norms.weight_std import WSConv3d

# Norms whose layers need channels divisible by norm.options.num_groups.
GROUPED_NORMS = frozenset({"group", "ws_group"})

# Norms followed by no learnable shift: the conv keeps its bias. (instance without affine is decided
# per option in NormSpec.conv.)
_NO_SHIFT_NORMS = frozenset({"none", "weightnorm"})


def _batch(channels: int, o: dict) -> nn.Module:
    return nn.BatchNorm3d(channels, eps=o["eps"], momentum=o["momentum"])


def _instance(channels: int, o: dict) -> nn.Module:
    return nn.InstanceNorm3d(
        channels,
        eps=o["eps"],
        momentum=o["momentum"],
        affine=o["affine"],
        track_running_stats=o["track_running_stats"],
    )


def _group(channels: int, o: dict) -> nn.Module:
    _check_divisible(o["num_groups"], channels)
    return nn.GroupNorm(o["num_groups"], channels, eps=o["eps"])


def _layer(channels: int, o: dict) -> nn.Module:
    # One group: statistics per sample over C x D x H x W (not nnU-Net's per-voxel LayerNorm over C).
    return nn.GroupNorm(1, channels, eps=o["eps"])


def _identity(channels: int, o: dict) -> nn.Module:
    return nn.Identity()


_NORM_BUILDERS: dict[str, Callable[[int, dict], nn.Module]] = {
    "batch": _batch,
    "instance": _instance,
    "group": _group,
    "layer": _layer,
    "none": _identity,
    "batchrenorm": make_batch_renorm,
    "ghostbatch": lambda c, o: GhostBatchNorm(c, o["virtual_batch"], eps=o["eps"], momentum=o["momentum"]),
    "syncbatch": lambda c, o: PortableSyncBatchNorm(c, eps=o["eps"], momentum=o["momentum"]),
    "ws_group": _group,
    "weightnorm": _identity,
    "frn": lambda c, o: FilterResponseNorm(c, eps=o["eps"], learnable_eps=o["learnable_eps"]),
}


@dataclass(frozen=True)
class NormSpec:
    """A validated normalization choice: `name` from NORM_NAMES and its complete options (defaults filled).

    Construct with ``make_norm_spec(name, **options)`` (or ``NormSpec(name, options)``, same checks).
    `options` is a plain dict so that specs pickle (DDP spawn, joblib); treat it as read-only.
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        check_norm_name(self.name)
        # frozen dataclass: replace the user's options with the resolved copy.
        object.__setattr__(self, "options", resolve_options(self.name, dict(self.options)))

    @property
    def uses_batch_statistics(self) -> bool:
        """True when training-mode outputs depend on the other samples of the batch."""
        return self.name in BATCH_STAT_NORMS

    @property
    def includes_activation(self) -> bool:
        """True for frn: its TLU is the activation, so the block must not add another."""
        return self.name == "frn"

    @property
    def has_learnable_shift(self) -> bool:
        """Whether the norm ends with a learnable per-channel shift (β), making a conv bias redundant."""
        if self.name == "instance":
            return self.options["affine"]
        return self.name not in _NO_SHIFT_NORMS

    def norm(self, num_channels: int) -> nn.Module:
        """The normalization layer for (N, C, D, H, W) feature maps with C = num_channels."""
        return _NORM_BUILDERS[self.name](num_channels, self.options)

    def conv(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
    ) -> nn.Module:
        """The Conv3d to put before ``norm(out_channels)``: weight-standardized for ws_group,
        weight-normalized for weightnorm; no bias when the norm has a learnable shift. Every one is a
        CpuConv3d (an nn.Conv3d with a faster path for one sample on a CPU, see norms/cpu_conv.py)."""
        padding = kernel_size // 2 if padding is None else padding
        conv_type = WSConv3d if self.name == "ws_group" else CpuConv3d
        conv = conv_type(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            bias=not self.has_learnable_shift,
        )
        if self.name == "weightnorm":
            # w = g · v / ||v|| per output filter (dim 0).
            conv = weight_norm(conv, name="weight", dim=0)
        return conv


def make_norm_spec(name: str, **options: Any) -> NormSpec:
    """Validated NormSpec; UserError for an unknown name (did-you-mean) or a bad ``norm.options.<key>``."""
    return NormSpec(name, options)


def _check_divisible(num_groups: int, channels: int) -> None:
    # GroupNorm's own error ("num_channels must be divisible by num_groups") names no config key.
    if channels % num_groups:
        raise UserError(
            f"{option_key('num_groups')}={num_groups} does not divide {channels} channels; "
            f"choose a divisor of {channels}: {', '.join(map(str, _divisors(channels)))}"
        )


def _divisors(number: int) -> list[int]:
    return [d for d in range(1, number + 1) if number % d == 0]


def check_channels(spec: NormSpec, channels: list[int]) -> None:
    """Pre-flight check, before building a model: GroupNorm-based specs need every channel count
    (`channels[i]` at U-Net level i) divisible by norm.options.num_groups. No-op for other norms."""
    if spec.name not in GROUPED_NORMS or not channels:
        return
    num_groups = spec.options["num_groups"]
    for level, count in enumerate(channels):
        if count % num_groups:
            common = reduce(math.gcd, channels)
            listed = ", ".join(map(str, channels))
            raise UserError(
                f"{option_key('num_groups')}={num_groups} does not divide {count} channels (level {level}); "
                f"choose a divisor of {listed} (one of {', '.join(map(str, _divisors(common)))})"
            )
