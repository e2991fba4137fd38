"""Pre-flight check: refuse, before any work, configurations whose feature maps break a norm."""

from __future__ import annotations

import math

from omegaconf import DictConfig

from norm_experiments.errors import UserError
from norm_experiments.models import level_layout
from norm_experiments.norms import NormSpec, check_channels


def level_shapes(patch_size: list[int], depth: int) -> list[list[int]]:
    """Spatial size of the feature maps at each level (level 0 = full resolution)."""
    return [[p // 2**level for p in patch_size] for level in range(depth + 1)]


def preflight(spec: NormSpec, model_cfg: DictConfig, patch_size: list[int], effective_batch: int) -> None:
    """Raise UserError naming the level and the fix when a norm would see one value per channel.

    effective_batch: the patches each batch statistic is computed over (all ranks' for syncbatch)."""
    depth, channels = level_layout(model_cfg)
    factor = 2**depth
    if any(p % factor for p in patch_size):
        raise UserError(
            f"data.patch_size={list(patch_size)} must be divisible by {factor} "
            f"(the network downsamples {depth} times); e.g. {[max(factor, p // factor * factor) for p in patch_size]}"
        )
    check_channels(spec, channels)
    fix = (
        "use a larger data.patch_size, a smaller model.depth, or a batch-independent norm such as norm=group"
    )
    for level, shape in enumerate(level_shapes(patch_size, depth)):
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
