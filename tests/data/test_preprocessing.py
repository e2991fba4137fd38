"""Preprocessing by modality (CT: dataset percentiles and statistics; MR: per-case z-score) and
data.target_spacing=auto, checked number by number on real NIfTI files, in load_data and in real runs."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import EnsureChannelFirst, LoadImage, LoadImaged, Orientation

from norm_experiments.config import validate_config
from norm_experiments.data.layouts import find_cases, split_cases
from norm_experiments.data.pipeline import ThreadSafeNibabelReader, load_data
from norm_experiments.data.preprocessing import ras_spacing
from norm_experiments.data.synthetic import SynthConfig, generate_dataset
from norm_experiments.errors import UserError
from tests.helpers import compose_config, metrics_of, run_cli

from .conftest import write_nifti

CFG = SynthConfig(num_cases=6, shape=(16, 16, 16), radius_range=(3.0, 5.0), seed=11)


def set_json(root: Path, **changes: object) -> None:
    path = root / "dataset.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


def hu_like(image: np.ndarray, seed: int) -> np.ndarray:
    """Synthetic intensities made CT-like: a wide range and a few extreme voxels for the clipping to cut."""
    out = image * 300.0 - 100.0
    rng = np.random.default_rng(seed)
    spikes = rng.random(out.shape) < 0.01
    out[spikes] = rng.choice([-1500.0, 3000.0], size=int(spikes.sum()))
    return out.astype(np.float32)


@pytest.fixture
def ct_dataset(tmp_path: Path) -> Path:
    """An MSD dataset whose dataset.json says modality CT."""
    root = generate_dataset(tmp_path / "ct", CFG, "msd")
    for i, image in enumerate(sorted((root / "imagesTr").glob("*.nii.gz"))):
        img = nib.load(str(image))
        nib.save(nib.Nifti1Image(hu_like(np.asarray(img.dataobj), i), img.affine, img.header), str(image))
    set_json(root, modality={"0": "CT"})
    return root


def load(overrides: list[str], cache: Path):
    cfg = compose_config([*overrides, "data.patch_size=[8,8,8]", f"data.cache_dir={cache}"])
    return load_data(cfg.data)


def pooled_foreground(root: Path, names: list[str], image_of, channel: int = 0) -> np.ndarray:
    """Every foreground voxel (label > 0) of channel `channel` over the named cases."""
    values = []
    for name in names:
        image = image_of(root, name, channel)
        label = np.asarray(nib.load(str(root / "labelsTr" / f"{name}.nii.gz")).dataobj)
        values.append(image[label > 0].astype(np.float64))
    return np.concatenate(values)


def msd_image(root: Path, name: str, channel: int) -> np.ndarray:
    data = np.asarray(nib.load(str(root / "imagesTr" / f"{name}.nii.gz")).dataobj)
    return data if data.ndim == 3 else data[..., channel]


def assert_ct_statistics(stats: dict, fg: np.ndarray) -> tuple[float, float, float, float]:
    low, high = np.percentile(fg, [0.5, 99.5])
    mean, std = fg.mean(), fg.std()
    assert stats["voxels"] == fg.size
    assert stats["mean"] == pytest.approx(mean, rel=1e-9)
    assert stats["std"] == pytest.approx(std, rel=1e-9)
    assert stats["percentile_00_5"] == pytest.approx(low, rel=1e-9)
    assert stats["percentile_99_5"] == pytest.approx(high, rel=1e-9)
    return low, high, mean, std


# ---------------------------------------------------------------------------------------------------------
# CT


def smoke_run(tmp_path: Path, *overrides: str) -> dict:
    """A smoke run through the real CLI, its cache in tmp_path; returns its metrics.json."""
    run_dir = tmp_path / "run"
    args = ["experiment=smoke", *overrides, "trainer.num_threads=1", f"data.cache_dir={tmp_path / 'cache'}"]
    result = run_cli([*args, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return metrics_of(run_dir)


def test_ct_dataset_gets_ct_normalization_by_itself(ct_dataset: Path, tmp_path: Path) -> None:
    before = sorted(str(p) for p in ct_dataset.rglob("*"))
    cache = tmp_path / "cache"
    bundle = load(["data=msd", f"data.root={ct_dataset}"], cache)
    prep = bundle.preprocessing
    assert (
        prep["intensity"] == "auto" and prep["modalities"] == ["CT"] and prep["channel_intensity"] == ["ct"]
    )

    train_names = [v.name for v in bundle.train]
    fg = pooled_foreground(ct_dataset, train_names, msd_image)
    low, high, mean, std = assert_ct_statistics(prep["ct_statistics"]["0"], fg)
    assert low > -1500 and high < 3000  # the spikes are outside the percentiles: clipping matters here

    for vol in bundle.train + bundle.val:  # validation cases use the training statistics
        raw = msd_image(ct_dataset, vol.name, 0)  # the synthetic affine is RAS already: same voxel order
        np.testing.assert_allclose(vol.image[0].numpy(), (np.clip(raw, low, high) - mean) / std, atol=1e-4)

    assert sorted(str(p) for p in ct_dataset.rglob("*")) == before  # nothing written into the dataset
    cached = cache / "fingerprints" / f"{prep['dataset_fingerprint']}.json"
    assert json.loads(cached.read_text())["foreground_intensity"]["0"]["mean"] == pytest.approx(mean)


def test_ct_statistics_are_cached_by_fingerprint(ct_dataset: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    overrides = ["data=msd", f"data.root={ct_dataset}"]
    first = load(overrides, cache).preprocessing
    cached = cache / "fingerprints" / f"{first['dataset_fingerprint']}.json"
    content = json.loads(cached.read_text())
    content["foreground_intensity"]["0"]["mean"] = 123.0  # a value only the cache can supply
    cached.write_text(json.dumps(content))
    assert load(overrides, cache).preprocessing["ct_statistics"]["0"]["mean"] == 123.0

    bundle = load(overrides, cache)
    changed = ct_dataset / "imagesTr" / f"{bundle.train[0].name}.nii.gz"
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    again = load(overrides, cache).preprocessing
    assert again["dataset_fingerprint"] != first["dataset_fingerprint"]
    assert again["ct_statistics"]["0"]["mean"] == pytest.approx(first["ct_statistics"]["0"]["mean"])


def test_forced_intensity_overrides_the_modality(ct_dataset: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    zscored = load(["data=msd", f"data.root={ct_dataset}", "data.intensity=zscore"], cache)
    assert (
        zscored.preprocessing["channel_intensity"] == ["zscore"]
        and zscored.preprocessing["ct_statistics"] == {}
    )
    for vol in zscored.train:
        assert float(vol.image.mean()) == pytest.approx(0.0, abs=1e-5)
        assert float(vol.image.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    raw = load(["data=msd", f"data.root={ct_dataset}", "data.intensity=none"], cache)
    vol = raw.train[0]
    np.testing.assert_array_equal(vol.image[0].numpy(), msd_image(ct_dataset, vol.name, 0))


@pytest.mark.slow  # a subprocess of the real CLI
def test_ct_run_records_the_statistics_in_metrics(ct_dataset: Path, tmp_path: Path) -> None:
    metrics = smoke_run(tmp_path, "data=msd", f"data.root={ct_dataset}")
    prep = metrics["preprocessing"]
    assert metrics["status"] == "completed" and prep["channel_intensity"] == ["ct"]
    cfg = compose_config(["experiment=smoke", "data=msd", f"data.root={ct_dataset}"])
    cases, _ = find_cases("msd", ct_dataset)
    train, _ = split_cases(cases, cfg.data.val_fraction, cfg.data.split_seed)  # the run's split
    assert prep["training_cases"] == len(train)
    assert_ct_statistics(
        prep["ct_statistics"]["0"], pooled_foreground(ct_dataset, [c.name for c in train], msd_image)
    )


def test_ct_without_any_foreground_is_a_clear_error(ct_dataset: Path, tmp_path: Path) -> None:
    for label in (ct_dataset / "labelsTr").glob("*.nii.gz"):
        img = nib.load(str(label))
        nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), str(label))
    with pytest.raises(UserError, match="no foreground"):
        load(["data=msd", f"data.root={ct_dataset}"], tmp_path / "cache")


# ---------------------------------------------------------------------------------------------------------
# Several channels, each normalized on its own


@pytest.fixture
def ct_mr_dataset(tmp_path: Path) -> Path:
    """nnU-Net v2 layout, two channels per case: _0000 CT (HU-like), _0001 T2 (its own gain and offset)."""
    root = generate_dataset(tmp_path / "ctmr", CFG, "nnunet")
    for i, ct_file in enumerate(sorted((root / "imagesTr").glob("*_0000.nii.gz"))):
        img = nib.load(str(ct_file))
        data = np.asarray(img.dataobj)
        nib.save(nib.Nifti1Image(hu_like(data, i), img.affine, img.header), str(ct_file))
        t2 = (data * (2.0 + i) + 40.0 * i).astype(np.float32)
        nib.save(nib.Nifti1Image(t2, img.affine, img.header), str(ct_file).replace("_0000", "_0001"))
    set_json(root, channel_names={"0": "CT", "1": "T2"})
    return root


def nnunet_image(root: Path, name: str, channel: int) -> np.ndarray:
    return np.asarray(nib.load(str(root / "imagesTr" / f"{name}_{channel:04d}.nii.gz")).dataobj)


def test_ct_and_mr_channels_each_get_their_own(ct_mr_dataset: Path, tmp_path: Path) -> None:
    bundle = load(["data=nnunet", f"data.root={ct_mr_dataset}"], tmp_path / "cache")
    prep = bundle.preprocessing
    assert prep["modalities"] == ["CT", "T2"] and prep["channel_intensity"] == ["ct", "zscore"]
    assert set(prep["ct_statistics"]) == {"0"}
    fg = pooled_foreground(ct_mr_dataset, [v.name for v in bundle.train], nnunet_image, channel=0)
    low, high, mean, std = assert_ct_statistics(prep["ct_statistics"]["0"], fg)
    for vol in bundle.train + bundle.val:
        ct, t2 = vol.image[0].numpy(), vol.image[1].numpy()
        raw_ct = nnunet_image(ct_mr_dataset, vol.name, 0)
        np.testing.assert_allclose(ct, (np.clip(raw_ct, low, high) - mean) / std, atol=1e-4)
        assert float(t2.mean()) == pytest.approx(0.0, abs=1e-5)
        assert float(t2.std()) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow  # a subprocess of the real CLI
def test_ct_and_mr_channels_train_end_to_end(ct_mr_dataset: Path, tmp_path: Path) -> None:
    metrics = smoke_run(tmp_path, "data=nnunet", f"data.root={ct_mr_dataset}")
    assert metrics["status"] == "completed"
    assert metrics["preprocessing"]["channel_intensity"] == ["ct", "zscore"]
    assert metrics["preprocessing"]["ct_statistics"]["0"]["std"] > 0


def test_four_mr_channels_in_one_4d_file(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / "mr4", CFG, "msd")
    for image in (root / "imagesTr").glob("*.nii.gz"):
        img = nib.load(str(image))
        data = np.asarray(img.dataobj)
        four = np.stack([data * (c + 1) + 10 * c for c in range(4)], axis=-1).astype(np.float32)
        nib.save(nib.Nifti1Image(four, img.affine), str(image))
    set_json(root, modality={"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"})
    bundle = load(["data=msd", f"data.root={root}"], tmp_path / "cache")
    assert bundle.preprocessing["channel_intensity"] == ["zscore"] * 4
    for vol in bundle.train + bundle.val:
        assert vol.image.shape[0] == 4
        flat = vol.image.reshape(4, -1)
        np.testing.assert_allclose(flat.mean(dim=1).numpy(), 0.0, atol=1e-5)
        np.testing.assert_allclose(flat.std(dim=1, unbiased=False).numpy(), 1.0, atol=1e-4)


@pytest.mark.parametrize(
    "modality, expected", [(None, "zscore"), ("CT", "ct"), ("[CT]", "ct"), ("T1", "zscore")]
)
def test_folder_layout_modality_from_the_config(modality: str | None, expected: str, tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / "folder", CFG, "folder")
    overrides = ["data=folder", f"data.root={root}", "data.labels={0: background, 1: class1, 2: class2}"]
    if modality is not None:
        overrides.append(f"data.modality={modality}")
    prep = load(overrides, tmp_path / "cache").preprocessing
    assert prep["channel_intensity"] == [expected]


def test_modality_list_of_the_wrong_length_is_an_error(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / "folder", CFG, "folder")
    with pytest.raises(UserError, match=r"data.modality=.*2 channel\(s\) but the images have 1"):
        load(
            [
                "data=folder",
                f"data.root={root}",
                "data.labels=[background, class1, class2]",
                "data.modality=[CT,T2]",
            ],
            tmp_path / "cache",
        )


# ---------------------------------------------------------------------------------------------------------
# Spacing


SPACINGS = [
    (1.0, 1.0, 2.0),
    (1.5, 1.0, 2.5),
    (2.0, 1.2, 3.0),
    (0.8, 0.9, 1.5),
    (1.2, 1.1, 2.0),
    (1.6, 0.7, 1.0),
]


@pytest.fixture
def mixed_spacing_dataset(tmp_path: Path) -> Path:
    """An MSD dataset whose cases have different voxel spacings (same voxel arrays, different affines)."""
    root = generate_dataset(tmp_path / "mixed", CFG, "msd")
    for i, image in enumerate(sorted((root / "imagesTr").glob("*.nii.gz"))):
        label = root / "labelsTr" / image.name
        write_nifti(image, np.asarray(nib.load(str(image)).dataobj), SPACINGS[i])
        write_nifti(label, np.asarray(nib.load(str(label)).dataobj), SPACINGS[i])
    return root


@pytest.mark.slow  # a subprocess of the real CLI
def test_target_spacing_auto_resamples_to_the_median_of_the_training_cases(
    mixed_spacing_dataset: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    overrides = [
        "experiment=smoke",
        "data=msd",
        f"data.root={mixed_spacing_dataset}",
        "data.target_spacing=auto",
    ]
    result = run_cli([*overrides, "trainer.num_threads=1", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    prep = metrics_of(run_dir)["preprocessing"]

    bundle = load_data(compose_config(overrides).data)  # the run's split and cached volumes, in this process
    index = {f"synth_{i:03d}": i for i in range(len(SPACINGS))}
    expected = np.median([SPACINGS[index[v.name]] for v in bundle.train], axis=0)
    assert prep["target_spacing_setting"] == "auto"
    np.testing.assert_allclose(prep["target_spacing"], expected)
    assert bundle.preprocessing["target_spacing"] == prep["target_spacing"]
    for vol in bundle.train + bundle.val:
        np.testing.assert_allclose(vol.item["image"].pixdim[:3].numpy(), expected, rtol=1e-5)
        np.testing.assert_allclose(vol.item["label"].pixdim[:3].numpy(), expected, rtol=1e-5)
        own = np.array(SPACINGS[index[vol.name]])
        resampled = np.array(CFG.shape) * own / expected
        shape = np.array(vol.image.shape[1:])
        padded = np.maximum(np.round(resampled), 16)  # smoke's patch is 16^3: smaller volumes are padded
        assert np.all(np.abs(shape - padded) <= 1), (vol.name, shape, resampled)
        assert set(np.unique(vol.label.numpy())) <= {0, 1, 2}  # nearest neighbour: still class values


def test_spacing_is_read_in_the_ras_axes_the_loader_uses(tmp_path: Path) -> None:
    """A volume stored with permuted, flipped axes: our spacing must match MONAI's after Orientation(RAS)."""
    affine = np.array([[0, 0, -3.0, 0], [2.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])
    path = tmp_path / "permuted.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 12, 14), np.float32), affine), str(path))
    image = LoadImage(image_only=True)(str(path))
    oriented = Orientation("RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(EnsureChannelFirst()(image))
    assert ras_spacing(path) == pytest.approx((3.0, 2.0, 1.0))
    np.testing.assert_allclose(oriented.pixdim[:3].numpy(), ras_spacing(path))


# ---------------------------------------------------------------------------------------------------------
# Config checks


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.intensity=minmax", "data.intensity"),
        ("data.target_spacing=[1.0,2.0]", "data.target_spacing"),
        ("data.target_spacing=median", "data.target_spacing"),
        ("data.target_spacing=[1.0,0,1.0]", "data.target_spacing"),
    ],
)
def test_bad_preprocessing_keys_are_named(override: str, key: str) -> None:
    with pytest.raises(UserError, match=rf"^{key}: must be"):
        validate_config(compose_config([override]))


@pytest.mark.parametrize(
    "override", ["data.intensity=ct", "data.target_spacing=auto", "data.target_spacing=[1,1.5,2]"]
)
def test_good_preprocessing_keys_pass(override: str) -> None:
    validate_config(compose_config([override]))


# ---------------------------------------------------------------------------------------------------------
# Reading one file per channel from several threads (CacheDataset fills its cache with threads)


def test_multi_file_images_keep_every_channel_when_read_from_threads(ct_mr_dataset: Path) -> None:
    """MONAI's NibabelReader keeps read()'s file names on the shared instance; a label read by another
    thread used to cut a two-file image to one channel. Interleave both kinds of reads on 8 threads."""
    load = LoadImaged(["image", "label"], reader=ThreadSafeNibabelReader(), image_only=True)
    names = sorted(
        p.name.removesuffix("_0000.nii.gz") for p in (ct_mr_dataset / "imagesTr").glob("*_0000.nii.gz")
    )
    items = [
        {
            "image": [str(ct_mr_dataset / "imagesTr" / f"{n}_{c:04d}.nii.gz") for c in range(2)],
            "label": str(ct_mr_dataset / "labelsTr" / f"{n}.nii.gz"),
        }
        for n in names
    ] * 20
    with ThreadPoolExecutor(8) as pool:
        shapes = [tuple(d["image"].shape) for d in pool.map(load, items)]
    assert set(shapes) == {(2, *CFG.shape)}
