"""Pre-flight check: refuse, before any work, configurations whose feature maps break a norm."""

from __future__ import annotations

import math
from collections.abc import Sequence

from omegaconf import DictConfig

from norm_experiments.errors import UserError
from norm_experiments.models import Level, model_levels
from norm_experiments.norms import NormSpec, check_channels


def level_shapes(patch_size: Sequence[int], levels: list[Level]) -> list[list[int]]:
    """Spatial size of the feature maps at each level (level 0 = full resolution)."""
    return [[p // d for p, d in zip(patch_size, level.divisor)] for level in levels]


def preflight(
    spec: NormSpec,
    model_cfg: DictConfig,
    patch_size: list[int],
    effective_batch: int,
    spacing: Sequence[float] | None = None,
) -> None:
    """Raise UserError naming the level and the fix when a norm would see one value per channel.

    effective_batch: the patches each batch statistic is computed over (all ranks' for syncbatch).
    spacing: mm per voxel, where the network's plan depends on it (DynUNet). Unknown (None), DynUNet is
    checked as planned for isotropic voxels, which downsamples every axis the most: its bottleneck is the
    smallest any spacing gives, so a patch accepted here is accepted for every spacing."""
    levels = model_levels(model_cfg, patch_size, spacing)
    divisor = levels[-1].divisor
    if any(p % d for p, d in zip(patch_size, divisor)):
        fit = [max(d, p // d * d) for p, d in zip(patch_size, divisor)]
        raise UserError(
            f"data.patch_size={list(patch_size)} must be divisible by {'x'.join(map(str, divisor))} "
            f"(the network downsamples {len(levels) - 1} times); e.g. {fit}"
        )
    check_channels(spec, [level.channels for level in levels])
    fix = "use a larger data.patch_size, a shallower model, or a batch-independent norm such as norm=group"
    for level, shape in enumerate(level_shapes(patch_size, levels)):
        voxels = math.prod(shape)
        if spec.uses_batch_statistics and effective_batch * voxels == 1:
            raise UserError(
                f"norm={spec.name}: at level {level} the feature maps are {shape} and the batch holds "
                f"{effective_batch} patch, so BatchNorm would see one value per channel ('Expected more than 1 "
                f"value per channel'); {fix}"
            )
        if voxels < spec.record.min_spatial_voxels:
            raise UserError(
                f"norm={spec.name}: at level {level} the feature maps are {shape}, too few voxels for its "
                f"statistics per sample and channel; {fix}"
            )
