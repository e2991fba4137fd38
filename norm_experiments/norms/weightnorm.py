"""Weight Normalization (Salimans & Kingma 2016): conv weight w = g · v / ||v|| per output filter, and no
activation normalization at all (the conv keeps its bias). Independent of the batch."""

from __future__ import annotations

from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from norm_experiments.norms.convs import plain_conv
from norm_experiments.norms.registry import NormRecord, register


def weight_normalized_conv(*args, **kwargs) -> nn.Module:
    """The plain conv with w = g · v / ||v|| per output filter (dim 0)."""
    return weight_norm(plain_conv(*args, **kwargs), name="weight", dim=0)


RECORD = register(
    NormRecord(
        name="weightnorm",
        summary="none on activations; w = g·v/‖v‖ on convs",
        build=lambda channels, o: nn.Identity(),
        learnable_shift=lambda o: False,
        conv=weight_normalized_conv,
        spellings=("weightnormalization", "wn"),
    )
)
