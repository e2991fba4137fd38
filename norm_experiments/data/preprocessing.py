"""The deterministic preprocessing a dataset gets, chosen from the dataset: intensity by modality, spacing.

Intensity (data.intensity), per input channel, as nnU-Net does it:

- "ct": clip to the 0.5 and 99.5 percentiles of the *foreground* intensities (label > 0) pooled over the
  training cases, then subtract the pooled foreground mean and divide by the pooled foreground std (mean
  and std of the unclipped foreground voxels, as in nnU-Net's dataset fingerprint). CT intensities are
  Hounsfield units, comparable across cases, so one dataset-wide mapping keeps that meaning.
- "zscore": per-case z-score (mean 0, std 1 over the whole volume): MR intensities are arbitrary per scan.
- "none": the intensities as stored.
- "auto" (the default for real data): "ct" for channels that dataset.json declares as CT ("modality" in
  MSD, "channel_names" in nnU-Net v2; case-insensitive), "none" for nnU-Net's "noNorm", "zscore" for every
  other name. The folder layout has no dataset.json: data.modality names the channels' modality.

The CT statistics come from the training cases of the run's split only (the validation cases are not
looked at), from at most MAX_FOREGROUND_VOXELS foreground voxels in all (a fixed-seed random subset per
case beyond that). They are computed once and cached under data.cache_dir/fingerprints/, keyed by a
fingerprint of the training cases' files (names, sizes, modification times); nothing is written into the
dataset folder.

Spacing (data.target_spacing): null keeps every case's own voxel grid; [sx, sy, sz] resamples to that
spacing in mm (images trilinear, labels nearest neighbour; MONAI Spacingd); "auto" uses the median spacing
of the training cases per axis (nnU-Net's default target, without its special rule for very anisotropic
data). Spacings are read from the NIfTI affines in the RAS orientation the loader uses.

Normalization runs before resampling, in nnU-Net's order.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import MapTransform, NormalizeIntensity, ScaleIntensityRange
from omegaconf import DictConfig, OmegaConf

from norm_experiments.data.layouts import Case, DatasetInfo, shown
from norm_experiments.errors import UserError

log = logging.getLogger(__name__)

# Bump when the statistics change for the same files, so that old cached statistics are not reused.
STATS_VERSION = 1
MAX_FOREGROUND_VOXELS = 10**7  # float64 samples held at once: 80 MB (nnU-Net samples 10^8)
STATS_SEED = 1234
MIN_STD = 1e-8  # nnU-Net's floor for the CT std


@dataclass
class Preprocessing:
    """What load_data applies, and what metrics.json records about it (`record`)."""

    channel_intensity: list[str]  # "ct" | "zscore" | "none", one per input channel
    ct_statistics: dict[int, dict[str, float]]  # channel -> pooled foreground statistics (CT channels)
    target_spacing: list[float] | None  # mm, in the RAS array axes; None: each case keeps its own
    record: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# Which normalization per channel


def declared_modalities(data_cfg: DictConfig, info: DatasetInfo) -> tuple[str, ...] | None:
    """Each channel's modality from dataset.json or, where the layout has none, from data.modality."""
    if info.modalities is not None:
        return info.modalities
    raw = data_cfg.get("modality")
    if raw is None:
        return None
    names = [str(raw)] * info.num_channels if isinstance(raw, str) else [str(m) for m in raw]
    if len(names) != info.num_channels:
        raise UserError(
            f"data.modality={list(names)} names {len(names)} channel(s) but the images have {info.num_channels}"
        )
    return tuple(names)


def mode_for_modality(modality: str) -> str:
    """nnU-Net's mapping of a channel name to a normalization (its names, compared case-insensitively)."""
    return {"ct": "ct", "nonorm": "none"}.get(modality.strip().casefold(), "zscore")


def channel_modes(setting: str, modalities: Sequence[str] | None, num_channels: int) -> list[str]:
    if setting != "auto":
        return [setting] * num_channels
    if modalities is None:
        return ["zscore"] * num_channels
    return [mode_for_modality(m) for m in modalities]


# ---------------------------------------------------------------------------------------------------------
# Dataset fingerprint and CT statistics


def dataset_fingerprint(cases: Sequence[Case], root: Path) -> str:
    """A short hash of the cases' files (relative path, size, modification time): changes when a file does."""
    digest = hashlib.sha256(f"norm-experiments fingerprint v{STATS_VERSION}\n".encode())
    for case in sorted(cases, key=lambda c: c.name):
        for path in (*case.images, case.label):
            stat = path.stat()
            digest.update(f"{case.name}|{shown(path, root)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def dataset_files(cases: Sequence[Case], root: Path) -> str:
    """A short hash of the cases' files by relative path and size only: a copy of the same files (to a node's
    scratch disk, say: new modification times) keeps it; other data under the same names rarely does."""
    digest = hashlib.sha256(b"norm-experiments dataset files v1\n")
    for case in sorted(cases, key=lambda c: c.name):
        for path in (*case.images, case.label):
            digest.update(f"{case.name}|{shown(path, root)}|{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def _array(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def channel_arrays(case: Case) -> list[np.ndarray]:
    """The case's image as one 3D array per channel (one file per channel, or a 4D file, channels last)."""
    if len(case.images) > 1:
        return [_array(p) for p in case.images]
    image = _array(case.images[0])
    return [image] if image.ndim == 3 else [image[..., c] for c in range(image.shape[3])]


def foreground_mask(case: Case) -> np.ndarray:
    label = _array(case.label)
    return (label.reshape(label.shape[:3]) if label.ndim == 4 else label) > 0


def foreground_statistics(cases: Sequence[Case], num_channels: int) -> dict[int, dict[str, float]]:
    """Per channel: mean, std, 0.5 and 99.5 percentiles of the foreground voxels pooled over `cases`."""
    per_case = max(1, MAX_FOREGROUND_VOXELS // max(1, len(cases)))
    rng = np.random.default_rng(STATS_SEED)
    samples: list[list[np.ndarray]] = [[] for _ in range(num_channels)]
    for case in cases:
        mask = foreground_mask(case)
        for c, image in enumerate(channel_arrays(case)):
            values = np.asarray(image[mask], dtype=np.float64)
            if values.size > per_case:
                values = rng.choice(values, per_case, replace=False)
            samples[c].append(values)
    stats = {}
    for c, parts in enumerate(samples):
        values = np.concatenate(parts)
        if values.size == 0:
            raise UserError(
                f"data.intensity: channel {c} needs CT statistics from foreground voxels, but the "
                f"{len(cases)} training cases' labels have no foreground (label > 0)"
            )
        low, high = np.percentile(values, [0.5, 99.5])
        stats[c] = {
            "mean": float(values.mean()),
            "std": float(values.std()),
            "percentile_00_5": float(low),
            "percentile_99_5": float(high),
            "voxels": int(values.size),
        }
    return stats


def cached_statistics(
    cache_root: Path, fingerprint: str, compute: Callable[[], dict[int, dict[str, float]]]
) -> dict[int, dict[str, float]]:
    """The statistics stored for this fingerprint, or computed now and stored (atomically) for next time."""
    path = cache_root / "fingerprints" / f"{fingerprint}.json"
    if path.is_file():
        try:
            stored = json.loads(path.read_text())["foreground_intensity"]
            return {int(c): dict(s) for c, s in stored.items()}
        except (OSError, ValueError, KeyError, AttributeError):
            log.warning("%s: unreadable cached statistics; computing them again", path)
    stats = compute()
    content = {"fingerprint": fingerprint, "version": STATS_VERSION, "foreground_intensity": stats}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(content, f, indent=2)
        os.replace(tmp, path)  # concurrent runs write identical content; the last rename wins
    except OSError as err:  # a read-only or full cache costs a recomputation next time, not the run
        log.warning("%s: could not cache the dataset statistics (%s)", path, err.strerror)
    finally:
        if tmp is not None:  # a half-written file (a full disk, an interruption) is not left behind
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return stats


STALE_TEMPORARY_S = 600  # a statistics file takes milliseconds to write: an older temporary one is abandoned


def _remove_stale_temporaries(path: Path) -> None:
    """Remove the half-written temporaries of `path` that a process killed outright left behind."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*"):
        with contextlib.suppress(OSError):
            if time.time() - tmp.stat().st_mtime > STALE_TEMPORARY_S:
                tmp.unlink()


# ---------------------------------------------------------------------------------------------------------
# Spacing


def ras_spacing(path: Path) -> tuple[float, float, float]:
    """Voxel spacing in mm along the array axes after reorientation to RAS (what Orientationd gives)."""
    affine = nib.load(str(path)).affine
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    spacing = [0.0, 0.0, 0.0]
    for axis, (target, _flip) in enumerate(nib.orientations.io_orientation(affine)):
        spacing[int(target)] = float(zooms[axis])
    return spacing[0], spacing[1], spacing[2]


def median_spacing(cases: Sequence[Case]) -> list[float]:
    spacings = np.array([ras_spacing(c.images[0]) for c in cases])
    return [float(v) for v in np.median(spacings, axis=0)]


# ---------------------------------------------------------------------------------------------------------
# The plan and its transform


def plan_preprocessing(data_cfg: DictConfig, info: DatasetInfo, train_cases: Sequence[Case]) -> Preprocessing:
    """Decide every channel's normalization and the target spacing from the config and the training cases."""
    setting = str(data_cfg.intensity)
    modalities = declared_modalities(data_cfg, info)
    modes = channel_modes(setting, modalities, info.num_channels)
    fingerprint = dataset_fingerprint(train_cases, info.root)
    ct_stats: dict[int, dict[str, float]] = {}
    if "ct" in modes:
        cache_root = Path(str(data_cfg.cache_dir)).expanduser()
        stats = cached_statistics(
            cache_root, fingerprint, lambda: foreground_statistics(train_cases, info.num_channels)
        )
        ct_stats = {c: stats[c] for c, mode in enumerate(modes) if mode == "ct"}
    spacing_setting = data_cfg.target_spacing
    if spacing_setting == "auto":
        spacing = median_spacing(train_cases)
    elif spacing_setting is None:
        spacing = None
    else:
        spacing = [float(s) for s in spacing_setting]
    record = {
        "dataset_fingerprint": fingerprint,
        "dataset_files": dataset_files(train_cases, info.root),
        "intensity": setting,
        "modalities": list(modalities) if modalities is not None else None,
        "channel_intensity": modes,
        "ct_statistics": {str(c): s for c, s in ct_stats.items()},
        "target_spacing": spacing,
        "target_spacing_setting": OmegaConf.to_container(spacing_setting)
        if OmegaConf.is_config(spacing_setting)
        else spacing_setting,
        "training_cases": len(train_cases),
    }
    log.info("preprocessing: intensity %s per channel, target spacing %s", modes, spacing or "as stored")
    return Preprocessing(modes, ct_stats, spacing, record)


def ct_transform(stats: Mapping[str, float]) -> ScaleIntensityRange:
    """clip(x, p0.5, p99.5), then (x - mean) / std: one linear map from [p0.5, p99.5] with clipping."""
    low, high = stats["percentile_00_5"], stats["percentile_99_5"]
    mean, std = stats["mean"], max(stats["std"], MIN_STD)
    return ScaleIntensityRange(low, high, (low - mean) / std, (high - mean) / std, clip=True)


class ChannelIntensityd(MapTransform):
    """Normalize each channel of an image on its own, with one array transform per channel (None: keep)."""

    def __init__(self, key: str, per_channel: Sequence[Callable | None]) -> None:
        super().__init__([key])
        self.per_channel = list(per_channel)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            parts = [
                image[c : c + 1] if step is None else step(image[c : c + 1])
                for c, step in enumerate(self.per_channel)
            ]
            d[key] = parts[0] if len(parts) == 1 else torch.cat(parts)
        return d


def intensity_transform(prep: Preprocessing, key: str = "image") -> ChannelIntensityd | None:
    """The per-channel normalization of `prep`; None when every channel keeps its intensities."""
    if all(mode == "none" for mode in prep.channel_intensity):
        return None
    steps: list[Callable | None] = []
    for c, mode in enumerate(prep.channel_intensity):
        if mode == "zscore":
            steps.append(NormalizeIntensity())
        elif mode == "ct":
            steps.append(ct_transform(prep.ct_statistics[c]))
        else:
            steps.append(None)
    return ChannelIntensityd(key, steps)
