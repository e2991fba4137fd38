"""Training batches: where patches are cut, how they are flipped and turned, and that a batch depends only
on (seed, step), whichever device holds the cached volumes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import FgBgToIndicesd
from omegaconf import DictConfig, OmegaConf

from norm_experiments.data.patches import Augmentation, PatchDraw, cut_patch
from norm_experiments.data.pipeline import BatchSampler, Volume, keep_on_device, load_data
from tests.helpers import compose_config


def data_cfg(batch_size: int = 2, flip: float = 0.0, rot90: float = 0.0, **keys) -> DictConfig:
    """The data keys BatchSampler reads; other keys (foreground_fraction, patch_size...) as keywords."""
    cfg = {
        "batch_size": batch_size,
        "patches_per_volume": 1,
        "patch_size": [8, 8, 8],
        "foreground_fraction": 0.5,
        "augment": {"flip_prob": flip, "rot90_prob": rot90},
        **keys,
    }
    return OmegaConf.create(cfg)


def cube_volume(name: str, shape=(20, 20, 20), cube=slice(8, 12), seed: int = 0) -> Volume:
    """A random image and a label that is 1 on a central cube only, cached as load_data caches a case."""
    image = torch.from_numpy(np.random.default_rng(seed).normal(size=(1, *shape)).astype(np.float32))
    label = torch.zeros(1, *shape)
    label[:, cube, cube, cube] = 1
    item = FgBgToIndicesd("label")({"image": image, "label": label})
    return Volume(name=name, item=item, spacing=(1.0, 1.0, 1.0))


def test_cut_patch_matches_numpy_slicing_flips_and_turns() -> None:
    volume = torch.arange(2 * 10 * 11 * 12, dtype=torch.float32).reshape(2, 10, 11, 12)
    draw = PatchDraw(start=(1, 2, 3), flip_axes=(0, 2), quarter_turns=3)
    expected = volume.numpy()[:, 1:7, 2:8, 3:9]
    expected = np.flip(expected, axis=(1, 3))
    expected = np.rot90(expected, k=3, axes=(2, 3))
    patch = cut_patch(volume, draw, (6, 6, 6))
    assert patch.shape == (2, 6, 6, 6)
    np.testing.assert_array_equal(patch.numpy(), expected)


@pytest.mark.parametrize(("fraction", "centre_is_foreground"), [(1.0, True), (0.0, False)])
def test_foreground_fraction_decides_the_centre_voxel(fraction: float, centre_is_foreground: bool) -> None:
    volumes = [cube_volume(f"case{i}", seed=i) for i in range(3)]
    sampler = BatchSampler(volumes, data_cfg(foreground_fraction=fraction, batch_size=3), seed=0)
    for step in range(20):
        _, labels = sampler.batch(step)
        centre = labels[:, 0, 4, 4, 4]  # start = centre - 8 // 2
        assert bool((centre == 1).all()) if centre_is_foreground else bool((centre == 0).all())


def test_half_foreground_patches_on_average() -> None:
    volumes = [cube_volume(f"case{i}", seed=i) for i in range(4)]
    sampler = BatchSampler(volumes, data_cfg(batch_size=4), seed=1)
    centres = torch.cat([sampler.batch(step)[1][:, 0, 4, 4, 4] for step in range(100)])
    assert 0.4 < float(centres.float().mean()) < 0.6  # 400 draws of p = 0.5: 5 standard deviations


def test_patch_holds_the_voxels_of_its_volume() -> None:
    volumes = [cube_volume("a", seed=3)]
    sampler = BatchSampler(volumes, data_cfg(batch_size=1), seed=2)
    images, labels = sampler.batch(0)
    image = volumes[0].image
    # Find the patch in the volume: a random image makes the position unique.
    hits = [
        (d, h, w)
        for d in range(13)
        for h in range(13)
        for w in range(13)
        if torch.equal(image[:, d : d + 8, h : h + 8, w : w + 8], images[0])
    ]
    assert len(hits) == 1
    d, h, w = hits[0]
    assert torch.equal(volumes[0].label[:, d : d + 8, h : h + 8, w : w + 8].long(), labels[0])
    assert images.dtype == torch.float32 and labels.dtype == torch.int64


def test_image_and_label_are_cut_flipped_and_turned_alike() -> None:
    volumes = []
    for i in range(3):
        vol = cube_volume(f"case{i}", seed=i)
        vol.item["label"] = (vol.item["image"] > 0).float()  # a label that follows the image voxel by voxel
        volumes.append(vol)
    sampler = BatchSampler(volumes, data_cfg(batch_size=3, flip=1.0, rot90=1.0), seed=0)
    for step in range(5):
        images, labels = sampler.batch(step)
        assert torch.equal(labels, (images > 0).long())


def test_batch_is_a_function_of_seed_and_step() -> None:
    volumes = [cube_volume(f"case{i}", seed=i) for i in range(5)]
    cfg = data_cfg(flip=0.5, rot90=0.5)
    a, b = BatchSampler(volumes, cfg, seed=4), BatchSampler(volumes, cfg, seed=4)
    for step in (7, 0, 3):  # any order: no state carried from one batch to the next
        assert torch.equal(a.batch(step)[0], b.batch(step)[0])
    assert not torch.equal(a.batch(1)[0], a.batch(2)[0])
    assert not torch.equal(a.batch(1)[0], BatchSampler(volumes, cfg, seed=5).batch(1)[0])


def test_each_epoch_draws_every_volume_once() -> None:
    volumes = [cube_volume(f"case{i}", seed=i) for i in range(6)]
    sampler = BatchSampler(volumes, data_cfg(), seed=0)
    for epoch in range(3):
        drawn = [i for step in range(3 * epoch, 3 * epoch + 3) for i in sampler._volume_indices(step)]
        assert sorted(drawn) == list(range(6))


def test_ranks_split_the_global_batch() -> None:
    volumes = [cube_volume(f"case{i}", seed=i) for i in range(5)]
    whole = BatchSampler(volumes, data_cfg(batch_size=4, flip=0.5, rot90=0.5), seed=3)
    ranks = [BatchSampler(volumes, data_cfg(batch_size=2, flip=0.5, rot90=0.5), 3, r, 2) for r in (0, 1)]
    for step in range(4):
        joined = torch.cat([r.batch(step)[0] for r in ranks])
        assert torch.equal(joined, whole.batch(step)[0])


def test_flips_and_quarter_turns_follow_their_probabilities() -> None:
    augmentation = Augmentation((8, 8, 8), 0.5, flip_prob=0.5, rot90_prob=0.5)
    rand = np.random.RandomState(0)
    fg, bg = np.array([0]), np.array([1])
    draws = [augmentation.draw(rand, (20, 20, 20), fg, bg, 1)[0] for _ in range(2000)]
    flips = Counter(axis for d in draws for axis in d.flip_axes)
    assert all(900 < flips[axis] < 1100 for axis in range(3)), flips
    turns = Counter(d.quarter_turns for d in draws)
    assert 900 < turns[0] < 1100 and all(250 < turns[k] < 420 for k in (1, 2, 3)), turns


def test_patches_not_square_in_h_w_only_turn_half_way() -> None:
    volumes = [cube_volume(f"case{i}", seed=i) for i in range(3)]
    cfg = data_cfg(patch_size=[8, 6, 10], rot90=1.0)
    images, labels = BatchSampler(volumes, cfg, seed=0).batch(0)
    assert images.shape == (2, 1, 8, 6, 10) and labels.shape == (2, 1, 8, 6, 10)
    augmentation = Augmentation((8, 6, 10), 0.5, flip_prob=0.0, rot90_prob=1.0)
    draws = augmentation.draw(np.random.RandomState(1), (20, 20, 20), np.array([0]), np.array([1]), 50)
    assert {d.quarter_turns for d in draws} == {2}


def test_real_dataset_batches(make_dataset) -> None:
    """Through load_data: NIfTI files read, cached, and cut into batches of the configured shape."""
    root = make_dataset(num_cases=4)
    cfg = compose_config(
        ["data=msd", f"data.root={root}", "data.patch_size=[8,8,8]", "data.patches_per_volume=2"]
    )
    bundle = load_data(cfg.data)
    images, labels = BatchSampler(bundle.train, cfg.data, seed=0).batch(0)
    assert images.shape == (4, 1, 8, 8, 8) and labels.shape == (4, 1, 8, 8, 8)
    assert set(labels.unique().tolist()) <= {0, 1, 2}
    keep_on_device(bundle, torch.device("cpu"))  # a CPU run: nothing moves
    assert torch.equal(BatchSampler(bundle.train, cfg.data, seed=0).batch(0)[0], images)


@pytest.mark.cuda
def test_batches_cut_on_the_gpu_equal_those_cut_on_the_host(make_dataset, tmp_path: Path) -> None:
    root = make_dataset(num_cases=4)
    cfg = compose_config(["data=msd", f"data.root={root}", "data.patch_size=[8,8,8]"])
    host = load_data(cfg.data)
    gpu = load_data(cfg.data)
    keep_on_device(gpu, torch.device("cuda"))
    assert gpu.train[0].image.is_cuda
    for step in range(5):
        a, b = (
            BatchSampler(host.train, cfg.data, 0).batch(step),
            BatchSampler(gpu.train, cfg.data, 0).batch(step),
        )
        assert b[0].is_cuda
        assert torch.equal(a[0], b[0].cpu()) and torch.equal(a[1], b[1].cpu())
