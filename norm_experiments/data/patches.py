"""Random training patches cut from cached volumes with plain tensor ops, on whatever device holds them.

The random decisions (crop position, flips, quarter turns) are drawn on the host from a seeded RandomState;
cutting, flipping and rotating are indexing and copies of torch tensors. A patch is therefore the same
whether the cached volume lives in host memory or on the GPU (`data.cache_on_device`), and costs a few
small kernels instead of a MONAI transform chain (about 5 ms of Python per patch on a CPU core against
under 1 ms for this code; enough to starve a GPU).
Crop centres come from MONAI's own RandCropByPosNegLabel logic, so the foreground ratio means what it means
in MONAI.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms.utils import generate_pos_neg_label_crop_centers

# A training case without foreground is said once when the data is checked (data/checks.py); MONAI's cropper
# would warn at every draw of it. Set once here, not per draw: draws also run in the prefetch thread, and
# warnings.catch_warnings is not thread-safe.
warnings.filterwarnings(
    "ignore", message="Num foregrounds 0", category=UserWarning, module="monai.transforms.utils"
)


@dataclass(frozen=True)
class PatchDraw:
    """Where one patch is cut and how it is turned: all the randomness of one training patch."""

    start: tuple[int, int, int]  # first voxel of the patch in the volume (D, H, W)
    flip_axes: tuple[int, ...]  # spatial axes to flip: 0 = D, 1 = H, 2 = W
    quarter_turns: int  # rotation by 90 degrees x this in the H-W plane (0 = none)


@dataclass(frozen=True)
class Augmentation:
    """The random part of the training pipeline (data.foreground_fraction and data.augment)."""

    patch_size: tuple[int, int, int]
    foreground_fraction: float
    flip_prob: float
    rot90_prob: float

    def draw(
        self,
        rand: np.random.RandomState,
        volume_shape: Sequence[int],
        fg_indices: np.ndarray | torch.Tensor,
        bg_indices: np.ndarray | torch.Tensor,
        num_patches: int,
    ) -> list[PatchDraw]:
        """`num_patches` draws for one volume of spatial shape `volume_shape`.

        A patch is centred on a foreground voxel with probability foreground_fraction (otherwise on a
        background voxel), the centre moved inwards so the patch fits, as MONAI's RandCropByPosNegLabeld.
        """
        centers = generate_pos_neg_label_crop_centers(
            self.patch_size,
            num_patches,
            self.foreground_fraction,
            tuple(volume_shape),
            fg_indices,
            bg_indices,
            rand,
        )
        return [self._turns(rand, _start(center, self.patch_size)) for center in centers]

    def _turns(self, rand: np.random.RandomState, start: tuple[int, int, int]) -> PatchDraw:
        flips = tuple(axis for axis in range(3) if rand.rand() < self.flip_prob)
        turns = 0
        if rand.rand() < self.rot90_prob:
            # A quarter turn swaps H and W: patches that are not square in H-W only turn by 180 degrees,
            # so every patch of a batch keeps the configured shape.
            square = self.patch_size[1] == self.patch_size[2]
            turns = int(rand.randint(3)) + 1 if square else 2
        return PatchDraw(start, flips, turns)


def _start(center: Sequence[int], size: Sequence[int]) -> tuple[int, int, int]:
    """First voxel of a patch of `size` centred on `center` (MONAI's convention: start = centre - size // 2)."""
    return tuple(int(c) - int(s) // 2 for c, s in zip(center, size))  # type: ignore[return-value]


def cut_patch(volume: torch.Tensor, draw: PatchDraw, size: Sequence[int]) -> torch.Tensor:
    """The patch of a channel-first volume (C, D, H, W) that `draw` describes, on the volume's device."""
    (d, h, w), (sd, sh, sw) = draw.start, size
    patch = volume[:, d : d + sd, h : h + sh, w : w + sw]
    if draw.flip_axes:
        patch = torch.flip(patch, [axis + 1 for axis in draw.flip_axes])
    if draw.quarter_turns:
        patch = torch.rot90(patch, draw.quarter_turns, dims=(2, 3))
    return patch
