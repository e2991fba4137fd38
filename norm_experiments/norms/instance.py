"""InstanceNorm: statistics per sample and channel over D x H x W; independent of the batch (nnU-Net's)."""

from __future__ import annotations

from torch import nn

from norm_experiments.norms.options import Option, eps, flag, running_momentum
from norm_experiments.norms.registry import NormRecord, register


def _build(channels: int, o: dict) -> nn.Module:
    return nn.InstanceNorm3d(
        channels,
        eps=o["eps"],
        momentum=o["momentum"],
        affine=o["affine"],
        track_running_stats=o["track_running_stats"],
    )


RECORD = register(
    NormRecord(
        name="instance",
        summary="D×H×W per sample and channel",
        build=_build,
        options={
            "eps": eps(),
            "momentum": running_momentum(),
            "affine": Option(True, flag),  # PyTorch's and MONAI's default is False
            "track_running_stats": Option(False, flag),
        },
        learnable_shift=lambda o: o["affine"],
        min_spatial_voxels=2,  # PyTorch refuses one voxel per channel, even in eval mode
        spellings=("instancenorm", "in"),
        report_reference=True,  # batch-independent: the report's default reference norm
    )
)
