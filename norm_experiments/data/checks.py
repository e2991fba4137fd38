"""Validating cases before training: a bad file gives one clear UserError naming it, not a crash later.

Every file of a case is opened with nibabel and fully read, which catches: missing files, truncated or
corrupt .nii.gz, images that are 2D (or have a dimension of 1) where 3D is expected, NaN/inf image voxels,
a wrong channel count, image/label (and channel/channel) shape or affine mismatches, non-integer label
values and label values that are not declared classes. Paths in messages are relative to the dataset root.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from norm_experiments.data.layouts import Case, DatasetInfo, shown
from norm_experiments.errors import UserError


@dataclass
class _Header:
    """What the cross-file checks need once a file's voxels have been checked and dropped."""

    name: str  # as shown in messages
    shape: tuple[int, ...]
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(round(float(s), 4) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))


def check_case(case: Case, info: DatasetInfo, *, affine_tol: float = 1e-3) -> None:
    """Raise UserError naming the file at the first problem in one case; return None if it is sound."""
    images = [_check_image(path, info) for path in case.images]
    label = _check_label(case.label, info)
    _check_channels(case, images, info)
    for other in images[1:]:
        _check_same_grid(other, images[0], affine_tol)
    _check_same_grid(label, images[0], affine_tol)


def check_cases(cases: list[Case], info: DatasetInfo) -> None:
    """check_case for every case; stops at the first error."""
    for case in cases:
        check_case(case, info)


# ---------------------------------------------------------------------------------------------------------


def _open(path: Path, info: DatasetInfo, kind: str) -> tuple[_Header, nib.Nifti1Image]:
    name = shown(path, info.root)
    if not path.is_file():
        raise UserError(f"{name}: {kind} file not found")
    try:
        img = nib.load(str(path))
    except Exception as err:  # any reader failure means a bad file; report it by name, not as a traceback
        raise UserError(
            f"{name}: not a readable NIfTI file (truncated, corrupt or another format; {_reason(err)})"
        ) from None
    return _Header(name=name, shape=tuple(int(s) for s in img.shape), affine=np.asarray(img.affine)), img


def _voxels(header: _Header, img: nib.Nifti1Image) -> np.ndarray:
    """All voxels; a truncated or corrupt .nii.gz usually fails only here, when the data is decompressed."""
    try:
        return np.asanyarray(img.dataobj)
    except Exception as err:  # EOFError, zlib.error, gzip.BadGzipFile, OSError, ValueError ...
        raise UserError(f"{header.name}: truncated or corrupt file ({_reason(err)})") from None


def _reason(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _check_image(path: Path, info: DatasetInfo) -> _Header:
    header, img = _open(path, info, "image")
    shape = header.shape
    if len(shape) < 3 or min(shape[:3]) == 1:
        raise UserError(f"{header.name}: image is 2D (shape {shape}); expected a 3D volume")
    if len(shape) > 4:
        raise UserError(
            f"{header.name}: image has {len(shape)} dimensions {shape}; expected 3D or 4D (channels last)"
        )
    data = _voxels(header, img)
    if data.dtype.kind in "fc":
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise UserError(f"{header.name}: image has {bad} NaN or infinite voxels")
    return header


def _check_label(path: Path, info: DatasetInfo) -> _Header:
    header, img = _open(path, info, "label")
    shape = header.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]  # some tools write labels as (x, y, z, 1)
    if len(shape) != 3 or min(shape) == 1:
        raise UserError(f"{header.name}: label has shape {header.shape}; expected a 3D volume")
    data = _voxels(header, img)
    values = _label_values(data, header.name)
    undeclared = values - set(info.labels)
    if undeclared:
        raise UserError(
            f"{header.name}: label values {_fmt(undeclared)} are not among the declared classes "
            f"{_fmt(set(info.labels))} ({_labels_source(info)})"
        )
    return header


def _label_values(data: np.ndarray, name: str) -> set[int]:
    if data.dtype.kind in "fc":
        if not np.isfinite(data).all():
            raise UserError(f"{name}: label has NaN or infinite voxels")
        fraction = data[data != np.round(data)]
        if fraction.size:
            raise UserError(
                f"{name}: label has non-integer values (e.g. {float(fraction[0]):g}); "
                "labels must be whole class numbers (resampled with linear interpolation?)"
            )
        data = data.astype(np.int64)
    return {int(v) for v in np.unique(data)}


def _fmt(values: set[int]) -> str:
    return "{" + ", ".join(str(v) for v in sorted(values)) + "}"


def _labels_source(info: DatasetInfo) -> str:
    return "data.labels" if info.layout == "folder" else "dataset.json 'labels'"


def _check_channels(case: Case, images: list[_Header], info: DatasetInfo) -> None:
    if len(images) > 1:
        for header in images:
            if len(header.shape) == 4 and header.shape[3] != 1:
                raise UserError(f"{header.name}: is 4D {header.shape} but the case has one file per channel")
        channels = len(images)
    else:
        shape = images[0].shape
        channels = shape[3] if len(shape) == 4 else 1
    if channels != info.num_channels:
        source = {
            "msd": "dataset.json 'modality'",
            "nnunet": "dataset.json 'channel_names'",
            "folder": "the first image of the dataset",
        }[info.layout]
        raise UserError(
            f"{images[0].name}: has {channels} input channel(s) "
            f"but the dataset has {info.num_channels} ({source})"
        )


def _check_same_grid(header: _Header, reference: _Header, tol: float) -> None:
    """Same spatial shape and (within tol) the same affine, so that voxels correspond."""
    if header.shape[:3] != reference.shape[:3]:
        raise UserError(
            f"{header.name}: spatial shape {header.shape[:3]} differs from "
            f"{reference.name} {reference.shape[:3]}"
        )
    diff = float(np.abs(header.affine - reference.affine).max())
    if diff > tol:
        raise UserError(
            f"{header.name}: affine differs from {reference.name} by up to {diff:.4g} (tolerance {tol:g}); "
            f"spacing {header.spacing} vs {reference.spacing}, "
            f"origin {_origin(header)} vs {_origin(reference)}"
        )


def _origin(header: _Header) -> tuple[float, ...]:
    return tuple(round(float(v), 3) for v in header.affine[:3, 3])
