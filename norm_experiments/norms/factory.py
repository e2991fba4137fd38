"""NormSpec: one normalization choice from the config, and the layers (norm and conv) it builds.

A U-Net block built from a spec is ``spec.conv(c_in, c_out)`` -> ``spec.norm(c_out)`` -> activation,
where the activation is skipped when ``spec.includes_activation`` (FRN brings its own TLU). What each norm
is and does comes from its record in the registry (norms/registry.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import reduce
from typing import Any

from torch import nn

from norm_experiments.errors import UserError
from norm_experiments.norms import registry
from norm_experiments.norms.group import divisors
from norm_experiments.norms.options import option_key, resolve


@dataclass(frozen=True)
class NormSpec:
    """A validated normalization choice: a registered `name` and its complete options (defaults filled).

    Construct with ``make_norm_spec(name, **options)`` (or ``NormSpec(name, options)``, same checks).
    `options` is a plain dict so that specs pickle (DDP spawn, joblib); treat it as read-only.
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        record = registry.get(self.name)
        # frozen dataclass: replace the user's options with the resolved copy.
        resolved = resolve(self.name, record.options, dict(self.options))
        if record.check is not None:
            record.check(resolved)
        object.__setattr__(self, "options", resolved)

    @property
    def record(self) -> registry.NormRecord:
        return registry.get(self.name)

    @property
    def uses_batch_statistics(self) -> bool:
        """True when training-mode outputs depend on the other samples of the batch."""
        return self.record.batch_dependent

    @property
    def bn_family(self) -> bool:
        """True when the layers keep running statistics (scored in BatchNorm's evaluation modes)."""
        return self.record.bn_family

    @property
    def includes_activation(self) -> bool:
        """True for frn: its TLU is the activation, so the block must not add another."""
        return self.record.includes_activation

    @property
    def has_learnable_shift(self) -> bool:
        """Whether the norm ends with a learnable per-channel shift (β), making a conv bias redundant."""
        return self.record.learnable_shift(self.options)

    def bn_batch(self, rank_patches: int, all_patches: int) -> int | None:
        """Patches each training-mode batch statistic is computed over (None: no batch statistics)."""
        return self.record.bn_batch(rank_patches, all_patches, self.options)

    def norm(self, num_channels: int) -> nn.Module:
        """The normalization layer for (N, C, D, H, W) feature maps with C = num_channels."""
        return self.record.build(num_channels, self.options)

    def conv(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
    ) -> nn.Module:
        """The Conv3d to put before ``norm(out_channels)`` (the norm's own, e.g. weight-standardized for
        ws_group); no bias when the norm has a learnable shift."""
        padding = kernel_size // 2 if padding is None else padding
        return self.record.conv(
            in_channels, out_channels, kernel_size, stride, padding, not self.has_learnable_shift
        )


def make_norm_spec(name: str, **options: Any) -> NormSpec:
    """Validated NormSpec; UserError for an unknown name (did-you-mean) or a bad ``norm.options.<key>``."""
    return NormSpec(name, options)


def check_channels(spec: NormSpec, channels: list[int]) -> None:
    """Pre-flight check, before building a model: norms with groups need every channel count (`channels[i]`
    at U-Net level i) divisible by their number of groups. No-op for other norms."""
    option = spec.record.groups_option
    if option is None or not channels:
        return
    groups = spec.options[option]
    for level, count in enumerate(channels):
        if count % groups:
            common = reduce(math.gcd, channels)
            listed = ", ".join(map(str, channels))
            raise UserError(
                f"{option_key(option)}={groups} does not divide {count} channels (level {level}); "
                f"choose a divisor of {listed} (one of {', '.join(map(str, divisors(common)))})"
            )
