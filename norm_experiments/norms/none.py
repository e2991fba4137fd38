"""No normalization: an identity layer, and the conv keeps its bias."""

from __future__ import annotations

from torch import nn

from norm_experiments.norms.registry import NormRecord, register

RECORD = register(
    NormRecord(
        name="none",
        summary="nothing (convs keep their bias)",
        build=lambda channels, o: nn.Identity(),
        learnable_shift=lambda o: False,
        spellings=("identity",),
    )
)
