"""Validating cases before training: a bad file gives one clear UserError naming it, not a crash later.

Every file of a case is opened with nibabel and fully read, which catches: missing files, truncated or
corrupt .nii.gz, images that are 2D (or have a dimension of 1) where 3D is expected, NaN/inf image voxels,
extreme intensities that normalization would turn into NaN or squash the rest of the image with, a wrong
channel count, image/label (and channel/channel) shape mismatches or voxel grids that differ in world space
(saying whether direction, spacing or origin differs), non-integer label values and label values that are
not declared classes. Paths in messages are relative to the dataset root.

Before any voxel is read, check_memory refuses a dataset whose headers claim more voxels than the memory
available could hold (and says how many cases may load at once); after the split, check_split_leak refuses a
validation case whose image files are byte-identical to a training case's. After preprocessing,
check_preprocessed refuses a volume that is no longer finite and a training or validation split without any
foreground, and warns about a validation case with the same voxels as a training case.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from norm_experiments import safe_io
from norm_experiments.data import registry as layout_registry
from norm_experiments.data.layouts import Case, DatasetInfo, link_problem, shown
from norm_experiments.errors import UserError

log = logging.getLogger(__name__)


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
    """Raise UserError naming the file at the first problem in one case; return None if it is sound.
    affine_tol: how far (mm, world space) the voxel grids of a case's files may lie apart."""
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


def check_split_leak(train: Sequence[Case], val: Sequence[Case], info: DatasetInfo) -> None:
    """Refuse a validation case whose image files are byte-identical copies of a training case's (the same
    scan under two names, or one file listed twice): its validation scores would measure memorization.

    Cheap: files are compared by size first, and only a validation case whose image sizes equal a training
    case's is hashed (BLAKE2b of the bytes, read in blocks), with that training case. The same voxels under
    another header are found after preprocessing instead (check_preprocessed, a warning)."""
    by_sizes: dict[tuple[int, ...], list[Case]] = {}
    for case in train:
        by_sizes.setdefault(_sizes(case), []).append(case)
    digests: dict[Path, str] = {}
    for case in val:
        candidates = by_sizes.get(_sizes(case), [])
        if not candidates:
            continue
        mine = _case_digest(case, digests)
        for other in candidates:
            if _case_digest(other, digests) == mine:
                a, b = shown(case.images[0], info.root), shown(other.images[0], info.root)
                raise UserError(
                    f"{a}: validation case '{case.name}' has the same image bytes as training case "
                    f"'{other.name}' ({b}): its validation scores would measure memorization; remove the copy "
                    "or choose other validation cases (data.val_cases, data.val_fraction, data.split_seed)"
                )


def _sizes(case: Case) -> tuple[int, ...]:
    return tuple(path.stat().st_size for path in case.images)


def _case_digest(case: Case, digests: dict[Path, str]) -> tuple[str, ...]:
    for path in case.images:
        if path not in digests:
            digest = hashlib.blake2b(digest_size=16)
            with open(path, "rb") as f:
                while block := f.read(2**20):
                    digest.update(block)
            digests[path] = digest.hexdigest()
    return tuple(digests[path] for path in case.images)


# Bytes a case takes per voxel once cached (pipeline.py): a float32 image per channel, a float32 label, and
# the int64 foreground/background index of every voxel of a training case.
CACHED_BYTES_PER_VOXEL = {"per_channel": 4, "label": 4, "indices": 8}
# While a case is read and prepared (decompressed, reoriented, normalized, its indices found) it takes about
# as much again as it will once cached: measured 17 bytes per voxel on top of 16 held, one channel, float32
# or int16 or float64 on disk, data.check_files on or off. A little more, to be safe.
LOADING_FACTOR = 1.25


def available_memory() -> int:
    """Bytes this process can still use: the kernel's estimate of available memory (MemAvailable), less if a
    cgroup (a container, a batch job) limits this process to less; the physical memory where neither is
    known."""
    limits = [safe_io.memory_bytes()]
    meminfo = _read_number("/proc/meminfo", "MemAvailable:")
    if meminfo is not None:
        limits.append(meminfo * 1024)
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        limit, usage = _read_number(limit_file), _read_number(usage_file)
        if limit is not None and usage is not None and limit < 2**60:  # "max" or a huge number: no limit
            limits.append(max(0, limit - usage))
            break
    return min(limits)


def _read_number(path: str, key: str | None = None) -> int | None:
    """The number in a one-line file (cgroup), or on the line starting with `key` (/proc/meminfo); None if
    the file or the line is not there."""
    try:
        with open(path) as f:
            for line in f:
                if key is None or line.startswith(key):
                    return int(line.split()[1 if key else 0])
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass(frozen=True)
class MemoryPlan:
    cached: int  # bytes the whole dataset takes once cached
    loading: int  # bytes the largest case takes while it is read and prepared, on top of what is cached
    available: int  # bytes this process could use when the plan was made

    @property
    def parallel(self) -> int:
        """How many cases may be read at once (MONAI's caching threads, one per CPU by default) without
        going past the available memory: at least 1."""
        room = (self.available - self.cached) // max(self.loading, 1)
        return int(max(1, min(os.cpu_count() or 1, room)))


def check_memory(cases: list[Case], info: DatasetInfo) -> MemoryPlan:
    """Refuse, from the headers alone and before any voxel is read, a dataset that would take more memory
    than this process has available: held in memory (every case cached) plus the largest case while it is
    read and prepared. A small .nii.gz can claim a huge shape (a compressed block of zeros), and reading it
    would exhaust the memory with no message; the message names the largest file and the sizes.

    Image and label headers both count (check_case reads every file whole), every dimension of an image
    (channels, and any beyond). Unreadable files are skipped here: check_case names them."""
    per_voxel = CACHED_BYTES_PER_VOXEL
    cached, largest = 0, (0, "", ())
    for case in cases:
        try:
            shapes = [tuple(int(s) for s in nib.load(str(p)).shape) for p in (*case.images, case.label)]
        except Exception:  # noqa: BLE001 - an unreadable file: check_case names it
            continue
        image_values = sum(math.prod(shape) for shape in shapes[:-1])
        voxels = max(math.prod(shape[:3]) for shape in shapes)
        size = per_voxel["per_channel"] * image_values + (per_voxel["label"] + per_voxel["indices"]) * voxels
        size = max(size, per_voxel["label"] * math.prod(shapes[-1]))  # a label claiming more than its image
        cached += size
        if size > largest[0]:
            index = max(range(len(shapes)), key=lambda i: math.prod(shapes[i]))
            path = (*case.images, case.label)[index]
            largest = (size, shown(path, info.root), shapes[index])
    size, name, shape = largest
    plan = MemoryPlan(cached=cached, loading=int(LOADING_FACTOR * size), available=available_memory())
    need = plan.cached + plan.loading
    if need > plan.available:
        raise UserError(
            f"{name}: its header claims {'x'.join(map(str, shape))} voxels; loading the dataset would take "
            f"about {need / 2**30:.3g} GiB ({plan.cached / 2**30:.3g} GiB held for training, "
            f"{size / 2**30:.3g} GiB of it for this case, and {plan.loading / 2**30:.3g} GiB more while it is "
            f"read), more than this machine's {plan.available / 2**30:.3g} GiB of available memory "
            f"(of {safe_io.memory_bytes() / 2**30:.3g} GiB)"
        )
    if need > plan.available // 2:
        log.warning(
            "data: holding the dataset will take about %.3g GiB of the %.3g GiB of memory available (largest "
            "file %s: %s voxels)",
            need / 2**30,
            plan.available / 2**30,
            name,
            "x".join(map(str, shape)),
        )
    return plan


# ---------------------------------------------------------------------------------------------------------


def _open(path: Path, info: DatasetInfo, kind: str) -> tuple[_Header, nib.Nifti1Image]:
    name = shown(path, info.root)
    problem = link_problem(path)
    if problem:
        raise UserError(f"{name}: {problem}")
    if not path.is_file():
        raise UserError(f"{name}: {kind} file not found")
    try:
        img = nib.load(str(path))
    except Exception as err:  # any reader failure means a bad file; report it by name, not as a traceback
        raise UserError(
            f"{name}: not a readable NIfTI file (truncated, corrupt or another format; {_reason(err)})"
        ) from None
    header = _Header(name=name, shape=tuple(int(s) for s in img.shape), affine=np.asarray(img.affine))
    if 0 in header.shape:
        raise UserError(
            f"{name}: {kind} has an axis of length 0 (shape {header.shape}); expected a 3D volume"
        )
    problem = _affine_problem(header.affine)
    if problem:
        raise UserError(
            f"{name}: its affine (the header's voxel-to-world matrix) {problem}; fix the sform/qform"
        )
    return header, img


def _affine_problem(affine: np.ndarray) -> str | None:
    """Why a voxel grid cannot be placed in the world (spacing, resampling, HD95 and saved predictions read
    it), or None."""
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        return "holds NaN or infinite values"
    if abs(float(np.linalg.det(affine[:3, :3]))) < 1e-12:
        return "is singular (a voxel spacing of 0)"
    return None


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
    _check_real(header.name, data, "image")
    if data.dtype.kind in "fc":
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise UserError(f"{header.name}: image has {bad} NaN or infinite voxels")
    _check_intensity_range(header.name, data)
    return header


def _check_real(name: str, data: np.ndarray, kind: str) -> None:
    """One real number per voxel: not complex, not RGB (NIfTI allows both; training would crash or drop the
    imaginary part silently)."""
    if data.dtype.kind not in "biuf":
        raise UserError(
            f"{name}: {kind} voxels are of type {data.dtype} (complex or RGB); expected one real number per "
            "voxel (a channel per file, or a 4D file with channels last)"
        )


# A voxel this many times the spread of the image's bulk away from it is no intensity a scanner measures; a
# z-score of such an image squashes the bulk to one value (and from about 1e19 its variance overflows float32
# to NaN). Real images (CT, MR) span tens of bulk widths at most.
EXTREME_FACTOR = 1e6
_BULK = (0.1, 99.9)  # percentiles that define the bulk: "a few voxels" fall outside


def _check_intensity_range(name: str, data: np.ndarray) -> None:
    """Refuse an image (per channel, channels last) with a few voxels far outside its bulk."""
    channels = [data] if data.ndim == 3 else [data[..., c] for c in range(data.shape[3])]
    for c, channel in enumerate(channels):
        flat = channel.ravel()
        sample = flat[:: max(1, flat.size // 1_000_000)].astype(np.float64)  # percentiles: a strided sample
        low, high = (float(v) for v in np.percentile(sample, _BULK))
        smallest, largest = float(flat.min()), float(flat.max())
        if high > low and max(largest - high, low - smallest) > EXTREME_FACTOR * (high - low):
            where = f" (channel {c})" if len(channels) > 1 else ""
            raise UserError(
                f"{name}{where}: holds extreme intensities (from {smallest:.3g} to {largest:.3g}, while 99.8% "
                f"of its voxels lie in [{low:.4g}, {high:.4g}]): intensity normalization would squash the rest "
                "of the image to one value or overflow to NaN; fix or clip the image"
            )


def _check_label(path: Path, info: DatasetInfo) -> _Header:
    header, img = _open(path, info, "label")
    shape = header.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]  # some tools write labels as (x, y, z, 1)
    if len(shape) != 3 or min(shape) == 1:
        raise UserError(f"{header.name}: label has shape {header.shape}; expected a 3D volume")
    data = _voxels(header, img)
    _check_real(header.name, data, "label")
    values = _label_values(data, header.name)
    undeclared = values - set(info.labels)
    if undeclared:
        raise UserError(
            f"{header.name}: label values {_fmt(undeclared)} are not among the declared classes "
            f"{_fmt(set(info.labels))} ({_labels_source(info)}){_labels_example(info, undeclared)}"
        )
    return header


def _labels_example(info: DatasetInfo, undeclared: set[int]) -> str:
    """For a folder (classes from data.labels): the override that declares the values found, names to edit."""
    if info.layout != "folder":
        return ""
    values = set(info.labels) | undeclared
    if values != set(range(len(values))):  # e.g. a 0/255 mask: classes must be 0..K-1
        return (
            "; data.labels cannot declare them: the classes must be the consecutive values 0..K-1, so remap the "
            "label files to those (a 0/255 mask: 255 -> 1)"
        )
    names = {**{v: f"class{v}" for v in undeclared}, **info.labels}
    pairs = ",".join(f"{v}:{names[v]}" for v in sorted(names))
    return f"; e.g. 'data.labels={{{pairs}}}'"


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
        source = layout_registry.get(info.layout).channels_from
        raise UserError(
            f"{images[0].name}: has {channels} input channel(s) "
            f"but the dataset has {info.num_channels} ({source})"
        )


def _check_same_grid(header: _Header, reference: _Header, tol: float) -> None:
    """Same spatial shape, and the same voxel grid in world space (within tol mm), so that voxels
    correspond. A file stored with an axis flipped, its affine saying so, holds the same grid: accepted (the
    loader reorients every file to RAS)."""
    if header.shape[:3] != reference.shape[:3]:
        raise UserError(
            f"{header.name}: spatial shape {header.shape[:3]} differs from "
            f"{reference.name} {reference.shape[:3]}"
        )
    apart = _grid_distance(header.affine, reference.affine, header.shape[:3])
    if apart > tol:
        raise UserError(
            f"{header.name}: voxel grid differs from {reference.name}'s (voxel centres up to {apart:.3g} mm "
            f"apart in world space): {_geometry_difference(header, reference, tol)}"
        )


def _corners(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World coordinates (mm) of the centres of the grid's 8 corner voxels, one row each."""
    index = np.array([[*corner, 1.0] for corner in itertools.product(*[(0, n - 1) for n in shape])])
    return (affine @ index.T).T[:, :3]


def _grid_distance(affine: np.ndarray, reference: np.ndarray, shape: tuple[int, ...]) -> float:
    """How far apart (mm) two grids of one shape lie: each corner voxel to the nearest corner of the other
    (the same set of corners is the same grid, whatever order the voxels are stored in)."""
    a, b = _corners(affine, shape), _corners(reference, shape)
    distances = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=2)
    return float(max(distances.min(axis=1).max(), distances.min(axis=0).max()))


def _geometry_difference(header: _Header, reference: _Header, tol: float) -> str:
    """Which of direction, spacing and origin differ, with both values."""
    parts = []
    codes, ref_codes = "".join(nib.aff2axcodes(header.affine)), "".join(nib.aff2axcodes(reference.affine))
    directions = [a[:3, :3] / np.linalg.norm(a[:3, :3], axis=0) for a in (header.affine, reference.affine)]
    cosines = np.clip(np.sum(directions[0] * directions[1], axis=0), -1.0, 1.0)
    if codes != ref_codes:
        parts.append(f"direction {codes} vs {ref_codes}")
    elif float(np.degrees(np.arccos(cosines)).max()) > 1e-3:
        parts.append(f"direction turned by up to {float(np.degrees(np.arccos(cosines)).max()):.3g} degrees")
    if not np.allclose(header.spacing, reference.spacing, rtol=0, atol=1e-4):
        parts.append(f"spacing {header.spacing} vs {reference.spacing} mm")
    if float(np.linalg.norm(header.affine[:3, 3] - reference.affine[:3, 3])) > tol:
        parts.append(f"origin {_origin(header)} vs {_origin(reference)} mm")
    return "; ".join(parts) or "the voxel axes are permuted"


def _origin(header: _Header) -> tuple[float, ...]:
    return tuple(round(float(v), 3) for v in header.affine[:3, 3])


# ---------------------------------------------------------------------------------------------------------
# After preprocessing


def check_preprocessed(
    splits: Mapping[str, Sequence[Any]], files: Mapping[str, str], where: Mapping[str, str]
) -> None:
    """Refuse preprocessed volumes that are not finite (naming the case's image file) and a split without
    any foreground voxel: a network cannot learn from, nor a Dice score, background alone.

    splits: split name ("training", "validation") -> volumes (with .name, .image, .label); files: case name
    -> image file as messages show it; where: split name -> the keys that choose it, for the message.
    """
    for volumes in splits.values():
        for vol in volumes:
            image = vol.image
            if not torch.isfinite(image).all():
                bad = int((~torch.isfinite(image)).sum())
                raise UserError(
                    f"{files[vol.name]}: {bad} voxels are NaN or infinite after preprocessing (intensity "
                    "normalization or resampling of extreme values); fix or clip the image"
                )
    for val_name, train_name in duplicate_images(splits.get("training", []), splits.get("validation", [])):
        log.warning(
            "leakage: validation case %s holds the same voxels as training case %s; its validation scores "
            "measure memorization (choose other data.val_cases)",
            val_name,
            train_name,
        )
    empty = [vol.name for vol in splits.get("training", []) if not bool((vol.label > 0).any())]
    if empty and len(empty) < len(splits["training"]):  # said once here; MONAI's cropper warns at every draw
        log.info(
            "training cases without foreground (their patches are all centred on background): %s",
            ", ".join(empty[:8]) + (", ..." if len(empty) > 8 else ""),
        )
    for split, volumes in splits.items():
        if volumes and not any(bool((vol.label > 0).any()) for vol in volumes):
            names = ", ".join(vol.name for vol in volumes[:4]) + (", ..." if len(volumes) > 4 else "")
            raise UserError(
                f"the {split} split ({len(volumes)} case(s): {names}) has no foreground voxel (every label is "
                f"0, background): there is nothing to learn or to score; check the labels, or {where[split]}"
            )


def duplicate_images(train: Sequence[Any], val: Sequence[Any]) -> list[tuple[str, str]]:
    """(validation case, training case) pairs whose preprocessed images hold the same voxels: the same scan
    under two names, a leak that makes validation scores measure memorization."""
    seen: dict[str, str] = {}
    for vol in train:
        seen.setdefault(_voxel_hash(vol.image), vol.name)
    return [(vol.name, seen[h]) for vol in val if (h := _voxel_hash(vol.image)) in seen]


def _voxel_hash(image: torch.Tensor) -> str:
    array = image.detach().cpu().contiguous().numpy()
    digest = hashlib.blake2b(array.tobytes(), digest_size=16)
    digest.update(repr((array.shape, array.dtype.str)).encode())
    return digest.hexdigest()
