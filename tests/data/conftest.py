"""Shared fixtures for the data tests: small synthetic datasets and a NIfTI writer."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from norm_experiments.data.synthetic import SynthConfig, generate_dataset

SPACING = (1.5, 1.5, 2.0)


def write_nifti(path: Path, array: np.ndarray, spacing: tuple[float, ...] = SPACING) -> Path:
    """Save an array as NIfTI with the spacing on the affine's diagonal (what real datasets look like)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), str(path))
    return path


@pytest.fixture
def small_cfg() -> SynthConfig:
    """Tiny but complete: 2 foreground classes, 3 cases of 16^3 (tens of milliseconds to write)."""
    return SynthConfig(num_cases=3, shape=(16, 16, 16), radius_range=(2.0, 4.0), seed=7)


@pytest.fixture
def make_dataset(tmp_path: Path, small_cfg: SynthConfig) -> Callable[..., Path]:
    """make_dataset(layout="msd", **cfg_overrides) -> root of a freshly generated dataset."""
    count = 0

    def make(layout: str = "msd", **overrides) -> Path:
        nonlocal count
        count += 1
        cfg = dataclasses.replace(small_cfg, **overrides)
        return generate_dataset(tmp_path / f"{layout}-{count}", cfg, layout)

    return make
