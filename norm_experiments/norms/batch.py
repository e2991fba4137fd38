"""BatchNorm: statistics per channel over N x D x H x W of the batch in training, running averages in eval."""

from __future__ import annotations

from torch import nn

from norm_experiments.norms.options import eps, running_momentum
from norm_experiments.norms.registry import NormRecord, register

RECORD = register(
    NormRecord(
        name="batch",
        summary="N×D×H×W per channel; running statistics at eval",
        build=lambda channels, o: nn.BatchNorm3d(channels, eps=o["eps"], momentum=o["momentum"]),
        options={"eps": eps(), "momentum": running_momentum()},
        batch_dependent=True,
        bn_family=True,
        spellings=("batchnorm", "bn"),
    )
)
