"""From a `data` config to cached volumes and reproducible training batches.

The deterministic part (load, channel-first, RAS orientation, intensity normalization by modality,
optional resampling, padding, foreground indices; preprocessing.py says what is chosen and why) runs once
per case and is cached in memory (MONAI CacheDataset), optionally moved to the GPU (data.cache_on_device).
The random part (patch crops with a foreground ratio, flips, rotations; see patches.py) is re-seeded from
(seed, step) for every batch: the batch of a step is a pure function of the run's seed and the step number,
which makes a resumed run draw exactly the batches an uninterrupted run would, without saving any sampler
state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import CacheDataset, NibabelReader
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    FgBgToIndicesd,
    LoadImaged,
    Orientationd,
    Spacingd,
    SpatialPadd,
)
from omegaconf import DictConfig, OmegaConf

from norm_experiments.data import registry as layouts_registry
from norm_experiments.data.checks import (
    available_memory,
    check_case,
    check_cases,
    check_memory,
    check_preprocessed,
    check_split_leak,
)
from norm_experiments.data.generated import Generator, ensure_generated
from norm_experiments.data.layouts import Case, DatasetInfo, find_cases, full_paths, shown, split_cases
from norm_experiments.data.patches import Augmentation, cut_patch
from norm_experiments.data.preprocessing import Preprocessing, intensity_transform, plan_preprocessing
from norm_experiments.errors import UserError
from norm_experiments.plugins import resolve

log = logging.getLogger(__name__)

KEYS = ("image", "label")


@dataclass
class Volume:
    """One preprocessed case held in memory: image (C, D, H, W) float32, label (1, D, H, W)."""

    name: str
    item: dict  # the cached MONAI dictionary (image, label, foreground/background indices)
    spacing: tuple[float, ...]  # mm per voxel along (D, H, W) after preprocessing: surface distances need it

    @property
    def image(self) -> torch.Tensor:
        return plain_tensor(self.item["image"])

    @property
    def label(self) -> torch.Tensor:
        return plain_tensor(self.item["label"])

    @property
    def own(self) -> tuple[slice, ...]:
        """The voxels of the case itself in the (D, H, W) volume: padding to the patch (data.pad_to_patch) adds
        voxels that are no part of it, which scores leave out. SpatialPad's symmetric split: the smaller half
        before."""
        shape = tuple(self.item["image"].shape[1:])
        unpadded = self.item.get(UNPADDED, shape)
        return tuple(slice((s - u) // 2, (s - u) // 2 + u) for s, u in zip(shape, unpadded))


def plain_tensor(x) -> torch.Tensor:
    """A plain torch.Tensor (MONAI's MetaTensor carries metadata the model does not need, at a cost per op)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


@dataclass
class DataBundle:
    info: DatasetInfo
    train: list[Volume]
    val: list[Volume]
    # what metrics.json records about the preprocessing (intensity per channel, CT statistics, spacing)
    preprocessing: dict = field(default_factory=dict)


def is_generated(data_cfg: DictConfig) -> bool:
    """A dataset the project generates on first use (data.layout=NAME, parameters under data.NAME): the
    layout registry's records with a generator."""
    return str(data_cfg.layout) in layouts_registry.generated()


def generator_config(data_cfg: DictConfig) -> Generator:
    """The parameters of a generated dataset from data.<layout> (lists become tuples, as the dataclass
    expects); an unknown key is refused by name."""
    layout = str(data_cfg.layout)
    cls = resolve(layouts_registry.get(layout).generator)
    raw = OmegaConf.to_container(data_cfg[layout], resolve=True)
    assert isinstance(raw, dict)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise UserError(
                f"data.{layout}.{key}: not a key this project reads; known: {', '.join(sorted(known))}"
            )
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def dataset_name(data_cfg: DictConfig) -> str:
    """What the run record calls the dataset (a condition of the study: runs on different datasets are never
    averaged together): the generated dataset's name, a preset's name, or the dataset folder's name."""
    if is_generated(data_cfg):
        return str(data_cfg.layout)
    if data_cfg.get("preset"):
        return str(data_cfg.preset)
    return Path(str(data_cfg.root)).expanduser().name or str(data_cfg.layout)


def dataset_root(data_cfg: DictConfig) -> tuple[str, Path]:
    """(layout, root) of the dataset; a generated one is written into its cache folder on first use."""
    if is_generated(data_cfg):
        cache = Path(str(data_cfg.cache_dir)).expanduser()
        return "msd", ensure_generated(cache, generator_config(data_cfg))
    return str(data_cfg.layout), Path(str(data_cfg.root)).expanduser()


class ThreadSafeNibabelReader(NibabelReader):
    """MONAI's NibabelReader, with the file names of read() kept per thread.

    NibabelReader stores read()'s file names on the instance for get_data(); CacheDataset fills its cache
    from several threads that share one reader, so a label read in one thread could cut another thread's
    image of several files (one per channel, nnU-Net layout) down to its first channel."""

    def __init__(self, *args, **kwargs) -> None:
        self._per_thread = threading.local()
        super().__init__(*args, **kwargs)

    @property
    def filenames(self):  # type: ignore[override]
        return self._per_thread.filenames

    @filenames.setter
    def filenames(self, value) -> None:
        self._per_thread.filenames = value


def deterministic_transforms(data_cfg: DictConfig, prep: Preprocessing) -> Compose:
    steps = [
        LoadImaged(KEYS, reader=ThreadSafeNibabelReader(), image_only=True),
        EnsureChannelFirstd(KEYS),
        Orientationd(KEYS, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ]
    normalize = intensity_transform(prep)
    if normalize is not None:  # before resampling, as nnU-Net does
        steps.append(normalize)
    if prep.target_spacing is not None:
        steps.append(Spacingd(KEYS, pixdim=prep.target_spacing, mode=("bilinear", "nearest")))
    if data_cfg.pad_to_patch:
        steps.append(_record_unpadded_shape)
        steps.append(SpatialPadd(KEYS, spatial_size=list(data_cfg.patch_size)))
    return Compose(steps)


UNPADDED = "unpadded_shape"  # a cached item's spatial shape before padding to the patch


def _record_unpadded_shape(item: dict) -> dict:
    """The case's own extent, kept beside the padded volume: scores count only its voxels (Volume.own)."""
    return {**item, UNPADDED: tuple(int(s) for s in item["image"].shape[1:])}


def _cache(cases: list[Case], info: DatasetInfo, transform: Compose, parallel: int) -> list[Volume]:
    """Every case through the deterministic transforms, `parallel` at a time (checks.MemoryPlan.parallel:
    one per CPU where the memory allows). A file that fails to load (data.check_files=false lets a damaged
    one through) is named by the file checks, which are run then to find it."""
    items = [{"image": [str(p) for p in c.images], "label": str(c.label), "name": c.name} for c in cases]
    try:
        cached = CacheDataset(
            items, transform=transform, cache_rate=1.0, num_workers=parallel, progress=False
        )
    except (MemoryError, RecursionError):
        raise
    except Exception:
        for case in cases:
            check_case(case, info)  # raises UserError naming the first bad file
        raise  # every file is sound: not the data's fault
    return [Volume(case.name, cached[i], voxel_spacing(cached[i]["image"])) for i, case in enumerate(cases)]


def voxel_spacing(image) -> tuple[float, ...]:
    """Spacing in mm from a MetaTensor's affine (1 mm per voxel for a plain tensor without one)."""
    pixdim = getattr(image, "pixdim", None)
    if pixdim is None:
        return (1.0,) * (image.dim() - 1)
    return tuple(float(s) for s in pixdim)


def _check_patch_fits(volumes: list[Volume], patch: list[int]) -> None:
    for vol in volumes:
        shape = list(vol.item["image"].shape[1:])
        if any(s < p for s, p in zip(shape, patch)):
            raise UserError(
                f"data.patch_size={patch} is larger than case '{vol.name}' ({shape} after preprocessing) "
                "and data.pad_to_patch=false; use a smaller patch or data.pad_to_patch=true"
            )


def _check_resampled_size(cases: list[Case], prep: Preprocessing, num_channels: int) -> None:
    """Refuse a target spacing that would make the cached dataset (every case held in memory as float32
    images and labels) larger than this machine's memory, e.g. spacings in metres ([0.0015, 0.0015, 0.002])
    instead of mm: resampling would otherwise fail deep inside MONAI, or exhaust the memory."""
    if prep.target_spacing is None:
        return
    total, largest = 0, ("", [0, 0, 0])
    for case in cases:
        header = nib.load(str(case.images[0]))  # the header only
        zooms = np.sqrt((header.affine[:3, :3] ** 2).sum(axis=0))
        size, axes = [1, 1, 1], []
        for axis, (ras_axis, _flip) in enumerate(nib.orientations.io_orientation(header.affine)):
            target = prep.target_spacing[int(ras_axis)]
            size[int(ras_axis)] = max(1, round(header.shape[axis] * float(zooms[axis]) / target))
            axes.append((int(header.shape[axis]), size[int(ras_axis)]))
        total += math.prod(size) * (num_channels + 1) * 4
        if math.prod(size) > math.prod(largest[1]):
            largest = (case.name, size)
        _check_not_shrunk(case, prep, axes, zooms)
    memory = available_memory()
    if total > memory:
        name, size = largest
        raise UserError(
            f"data.target_spacing={prep.target_spacing}: resampled to it, the dataset would take "
            f"{total / 2**30:.3g} GiB of memory ({name}: {'x'.join(map(str, size))} voxels), more than this "
            f"machine's {memory / 2**30:.3g} GiB of available memory; spacings are in mm"
        )


# A case resampled to fewer voxels than this along an axis that had at least MIN_SHRUNK_FROM holds no anatomy
# any more: a spacing in other units (an affine in metres, or data.target_spacing in metres), not a choice.
MIN_RESAMPLED_AXIS = 4
MIN_SHRUNK_FROM = 16


def _check_not_shrunk(case: Case, prep: Preprocessing, axes: list[tuple[int, int]], zooms) -> None:  # noqa: ANN001
    """`axes`: (voxels in the file, voxels resampled) per axis of the file."""
    if all(new >= MIN_RESAMPLED_AXIS or old < MIN_SHRUNK_FROM for old, new in axes):
        return
    spacing = ", ".join(f"{z:.3g}" for z in zooms[: len(axes)])
    raise UserError(
        f"data.target_spacing={prep.target_spacing}: resampled to it, case {case.name} shrinks from "
        f"{'x'.join(str(old) for old, _ in axes)} to {'x'.join(str(new) for _, new in axes)} voxels; its file "
        f"says ({spacing}) mm per voxel: spacings are in mm (an affine written in metres?)"
    )


def _check_preprocessed(train: list[Volume], val: list[Volume], cases: list[Case], info: DatasetInfo) -> None:
    """Finite volumes, and foreground in each split (data/checks.py): the messages name the file or the keys."""
    files = {case.name: shown(case.images[0], info.root) for case in cases}
    where = {
        "training": "choose other training cases (data.val_cases, data.val_fraction, data.split_seed)",
        "validation": "choose other validation cases (data.val_cases, data.val_fraction, data.split_seed)",
    }
    check_preprocessed({"training": train, "validation": val}, files, where)


def load_data(data_cfg: DictConfig) -> DataBundle:
    """Find, check, split and cache a dataset; user mistakes raise UserError naming the key or file."""
    layout, root = dataset_root(data_cfg)
    labels = OmegaConf.to_container(data_cfg.labels) if "labels" in data_cfg and data_cfg.labels else None
    remedy = _cache_remedy(data_cfg, root)
    with _damage_hint(remedy, root):
        cases, info = find_cases(layout, root, labels=labels)
    with full_paths() if remedy else contextlib.nullcontext():
        memory = check_memory(cases, info)  # from the headers, before any voxel is read
    if data_cfg.check_files:
        with _damage_hint(remedy, root):
            check_cases(cases, info)
    val_cases = list(data_cfg.val_cases) if data_cfg.val_cases else None
    train_cases, val_cases_ = split_cases(cases, data_cfg.val_fraction, data_cfg.split_seed, val_cases)
    check_split_leak(train_cases, val_cases_, info)  # a copied file in both splits: by size, then content
    prep = plan_preprocessing(data_cfg, info, train_cases)
    _check_resampled_size(cases, prep, info.num_channels)
    transform = deterministic_transforms(data_cfg, prep)
    with _damage_hint(remedy, root):
        with_indices = Compose([*transform.transforms, FgBgToIndicesd("label")])
        train = _cache(train_cases, info, with_indices, memory.parallel)
        val = _cache(val_cases_, info, transform, memory.parallel)
    _check_patch_fits(train + val, list(data_cfg.patch_size))
    _check_preprocessed(train, val, cases, info)
    log.info("data: %s (%s layout), %d training and %d validation cases", root, layout, len(train), len(val))
    return DataBundle(info=info, train=train, val=val, preprocessing=prep.record)


def _cache_remedy(data_cfg: DictConfig, root: Path) -> str | None:
    """How to get a sound copy of a dataset the project put in its cache (generated, or fetched for a
    preset); None for the user's own dataset."""
    if is_generated(data_cfg):
        return f"delete the folder {root} and the next run generates it again"
    if data_cfg.get("fetch"):
        return f"delete the folder {root} and run norm-exp-fetch {data_cfg.fetch} to download it again"
    return None


@contextlib.contextmanager
def _damage_hint(remedy: str | None, root: Path) -> Iterator[None]:
    """For a dataset in the project's cache (remedy given): messages name files by their full path (the user
    never typed the folder), and one about a file of the dataset says how to get a sound copy: a damaged
    cache file (a disk error, an edit, a copy cut short) is not the user's data to fix."""
    if remedy is None:
        yield
        return
    try:
        with full_paths():
            yield
    except UserError as err:
        message = str(err)
        if not message.startswith(os.path.abspath(root) + os.sep):  # not about a file of the dataset
            raise
        raise UserError(f"{message}; this dataset is a cache: {remedy}") from None


def host_indices(indices) -> np.ndarray:
    """Flat voxel indices as a plain numpy array in host memory."""
    return plain_tensor(indices).cpu().numpy()


def keep_on_device(bundle: DataBundle, device: torch.device) -> None:
    """Hold every cached image and label on `device` (data.cache_on_device): batches are then cut there and
    no step copies from host memory. The foreground/background indices stay on the host, where the crop
    positions are drawn. A dataset too large to copy is a UserError; one that fits but leaves too little
    room for training fails later with CUDA's own out-of-memory error."""
    if device.type == "cpu":
        return
    volumes = bundle.train + bundle.val
    # Labels as uint8 (class indices < 256): a quarter of float32's memory; batches are cast to int64.
    label_dtype = torch.uint8 if len(bundle.info.labels) <= 256 else torch.int32
    try:
        for vol in volumes:
            vol.item["image"] = vol.image.to(device)
            vol.item["label"] = vol.label.to(device, label_dtype)
    except torch.cuda.OutOfMemoryError:
        size = sum(v.image.nbytes + v.label.nbytes for v in volumes) / 2**30
        for vol in volumes:
            vol.item["image"], vol.item["label"] = vol.image.cpu(), vol.label.cpu()
        torch.cuda.empty_cache()
        raise UserError(
            f"data.cache_on_device=true: the cached dataset ({size:.1f} GiB) does not fit in the memory of "
            f"{device}; use data.cache_on_device=false"
        ) from None
    log.info("data: %d cached volumes kept on %s", len(volumes), device)


class BatchSampler:
    """The training batch of step t, a pure function of (seed, t).

    Volumes are drawn epoch by epoch without replacement (every case once per epoch, in a per-epoch random
    order), `batch_size` volumes per step, `patches_per_volume` random patches from each. Patches are cut on
    the device that holds the cached volumes (see patches.py): with data.cache_on_device the batch is
    already on the GPU.

    With several processes (DDP), step t draws world_size x batch_size volumes (and their augmentation
    seeds) as one global batch, and rank r takes the r-th slice of batch_size: the ranks together see
    exactly the batch one process with batch_size x world_size would see.
    """

    def __init__(
        self,
        volumes: list[Volume],
        data_cfg: DictConfig,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
    ) -> None:
        self.volumes = volumes
        self.pin_memory = pin_memory
        self.seed = seed
        self.batch_size = int(data_cfg.batch_size)
        self.rank, self.global_batch = rank, self.batch_size * world_size
        self.patches_per_volume = int(data_cfg.patches_per_volume)
        # Crop centres are drawn on the host from plain numpy indices: MONAI caches them as MetaTensors,
        # whose per-op bookkeeping made drawing a centre cost twice what cutting the patch does.
        self.fg_bg = [
            (host_indices(vol.item["label_fg_indices"]), host_indices(vol.item["label_bg_indices"]))
            for vol in volumes
        ]
        self.augmentation = Augmentation(
            patch_size=tuple(int(p) for p in data_cfg.patch_size),  # type: ignore[arg-type]
            foreground_fraction=float(data_cfg.foreground_fraction),
            flip_prob=float(data_cfg.augment.flip_prob),
            rot90_prob=float(data_cfg.augment.rot90_prob),
        )

    def _volume_indices(self, step: int) -> list[int]:
        """The volumes of the global batch of `step` (all ranks)."""
        n = len(self.volumes)
        indices = []
        for sample in range(step * self.global_batch, (step + 1) * self.global_batch):
            epoch, position = divmod(sample, n)
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
            indices.append(int(order[position]))
        return indices

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of shape (batch_size * patches_per_volume, C, *patch) and (..., 1, *patch)."""
        rng = np.random.default_rng([self.seed, step, 1])
        draws = [(index, int(rng.integers(2**31))) for index in self._volume_indices(step)]
        mine = draws[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        size = self.augmentation.patch_size
        images, labels = [], []
        for index, augment_seed in mine:
            vol = self.volumes[index]
            image, label = vol.image, vol.label
            fg, bg = self.fg_bg[index]
            rand = np.random.RandomState(augment_seed)
            for draw in self.augmentation.draw(rand, image.shape[1:], fg, bg, self.patches_per_volume):
                images.append(cut_patch(image, draw, size))
                labels.append(cut_patch(label, draw, size))
        images_t, labels_t = torch.stack(images).float(), torch.stack(labels).long()
        if self.pin_memory and images_t.device.type == "cpu":
            # page-locked host memory lets the copy to the GPU overlap with compute
            images_t, labels_t = images_t.pin_memory(), labels_t.pin_memory()
        return images_t, labels_t
