"""The synthetic generator: determinism, valid NIfTI, per-case intensity spread, caching and concurrency."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from norm_experiments.data import generated
from norm_experiments.data.layouts import find_cases
from norm_experiments.data.synthetic import SynthConfig, ensure_synthetic, generate_dataset, make_case
from norm_experiments.errors import UserError


def read_case(root: Path, name: str) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    return nib.load(root / "imagesTr" / f"{name}.nii.gz"), nib.load(root / "labelsTr" / f"{name}.nii.gz")


def arrays(root: Path, names: list[str]) -> list[np.ndarray]:
    out = []
    for name in names:
        image, label = read_case(root, name)
        out += [np.asarray(image.dataobj), np.asarray(label.dataobj)]
    return out


# ---------------------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_gives_identical_arrays(make_dataset):
    a, b = make_dataset(), make_dataset()
    names = [f"synth_{i:03d}" for i in range(3)]
    for x, y in zip(arrays(a, names), arrays(b, names), strict=True):
        assert x.dtype == y.dtype
        assert x.tobytes() == y.tobytes()


def test_different_seed_gives_different_arrays(small_cfg):
    other = dataclasses.replace(small_cfg, seed=small_cfg.seed + 1)
    for i in range(small_cfg.num_cases):
        image_a, label_a, _ = make_case(small_cfg, i)
        image_b, label_b, _ = make_case(other, i)
        assert not np.array_equal(image_a, image_b)
        assert not np.array_equal(label_a, label_b)


def test_cases_differ_from_each_other(small_cfg):
    first, second = make_case(small_cfg, 0), make_case(small_cfg, 1)
    assert not np.array_equal(first[0], second[0])


def test_key_is_stable_short_hex_and_field_sensitive():
    key = SynthConfig().key()
    assert key == SynthConfig().key()
    assert len(key) == 12 and int(key, 16) >= 0
    # YAML gives lists; they must hash like the tuples.
    assert SynthConfig(shape=[48, 48, 48], spacing=[1.5, 1.5, 2]).key() == key
    for change in (
        {"seed": 1},
        {"noise_std": 0.3},
        {"contrast_range": (1, 1)},
        {"gamma_range": (1, 1)},
        {"shape": (32, 48, 48)},
        {"intensity_offset_range": (0, 0)},
    ):
        assert SynthConfig(**change).key() != key, change


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("noise_std", -1.0),
        ("num_cases", 0),
        ("shape", (4, 16, 16)),
        ("num_classes", 0),
        ("objects_per_class", (0, 2)),
        ("radius_range", (5.0, 2.0)),
        ("intensity_scale_range", (0.0, 2.0)),
        ("intensity_offset_range", (1.0, -1.0)),
        ("bias_field", 1.5),
        ("bias_field", (0.3, 0.1)),
        ("contrast_range", (0.0, 1.0)),
        ("gamma_range", (1.2, 0.8)),
        ("class_imbalance", 0.0),
        ("seed", -1),  # numpy's generators refuse it: used to be a crash
    ],
)
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(UserError, match=field):
        SynthConfig(**{field: value})


# ---------------------------------------------------------------------------------------------------------
# NIfTI validity


def test_nifti_files_read_back_with_spacing_dtype_shape_and_classes(make_dataset, small_cfg):
    root = make_dataset()
    seen: set[int] = set()
    for i in range(small_cfg.num_cases):
        image, label = read_case(root, f"synth_{i:03d}")
        for img in (image, label):
            assert img.shape == small_cfg.shape
            np.testing.assert_allclose(img.affine, np.diag([*small_cfg.spacing, 1.0]))
            np.testing.assert_allclose(img.header.get_zooms(), small_cfg.spacing)
            assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
        assert image.get_data_dtype() == np.float32
        assert label.get_data_dtype() == np.uint8
        values = set(np.unique(np.asarray(label.dataobj)).tolist())
        assert values <= {0, 1, 2}
        seen |= values
    assert seen == {0, 1, 2}, "every class must appear somewhere"


def test_every_class_is_present_in_every_case():
    cfg = SynthConfig(num_cases=8, shape=(24, 24, 24), num_classes=4, class_imbalance=2.0, seed=3)
    for i in range(cfg.num_cases):
        _, label, _ = make_case(cfg, i)
        assert set(np.unique(label).tolist()) == set(range(5)), f"case {i}"


def test_monai_reads_the_spacing(make_dataset, small_cfg):
    from monai.transforms import LoadImage

    root = make_dataset()
    image = LoadImage(image_only=True)(str(root / "imagesTr" / "synth_000.nii.gz"))
    np.testing.assert_allclose(image.pixdim, small_cfg.spacing)


def test_dataset_json_msd(make_dataset):
    meta = json.loads((make_dataset() / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "class1", "2": "class2"}
    assert meta["modality"] == {"0": "MRI"}
    assert meta["numTraining"] == 3
    assert meta["training"][0] == {
        "image": "./imagesTr/synth_000.nii.gz",
        "label": "./labelsTr/synth_000.nii.gz",
    }
    assert [c["name"] for c in meta["synthetic"]["cases"]] == ["synth_000", "synth_001", "synth_002"]


def test_dataset_json_nnunet_and_folder_files(make_dataset):
    nnunet = make_dataset("nnunet")
    meta = json.loads((nnunet / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "class1": 1, "class2": 2}
    assert meta["channel_names"] == {"0": "MRI"} and meta["file_ending"] == ".nii.gz"
    assert (nnunet / "imagesTr" / "synth_002_0000.nii.gz").is_file()
    assert (nnunet / "labelsTr" / "synth_002.nii.gz").is_file()
    folder = make_dataset("folder")
    assert not (folder / "dataset.json").exists()
    assert (folder / "images" / "synth_000.nii.gz").is_file() and (
        folder / "labels" / "synth_000.nii.gz"
    ).is_file()


def test_class_imbalance_makes_higher_classes_smaller():
    cfg = SynthConfig(num_cases=6, shape=(32, 32, 32), class_imbalance=8.0, seed=1)
    counts = np.zeros(3)
    for i in range(cfg.num_cases):
        counts += np.bincount(make_case(cfg, i)[1].ravel(), minlength=3)
    assert counts[2] < counts[1] / 3


# ---------------------------------------------------------------------------------------------------------
# Per-case intensity variation (what makes BatchNorm's running statistics wrong)


def case_stats(cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    results = [make_case(cfg, i) for i in range(cfg.num_cases)]
    means = np.array([image.mean() for image, _, _ in results])
    stds = np.array([image.std() for image, _, _ in results])
    return means, stds, [params for _, _, params in results]


def test_per_case_intensity_varies_by_the_configured_range():
    cfg = SynthConfig(num_cases=16, shape=(16, 16, 16), radius_range=(2.0, 4.0), seed=5)
    means, stds, params = case_stats(cfg)
    gains = np.array([p["gain"] for p in params])
    offsets = np.array([p["offset"] for p in params])
    assert gains.min() >= 0.3 and gains.max() <= 3.0
    assert gains.max() / gains.min() > 4, "log-uniform gains should cover most of the 10x range"
    assert offsets.min() >= -2.0 and offsets.max() <= 2.0 and offsets.max() - offsets.min() > 2
    # The image standard deviation follows the gain: same content, different "scanner".
    assert stds.max() / stds.min() > 4
    ratio = stds / gains
    assert ratio.max() / ratio.min() < 2
    assert means.max() - means.min() > 3


def test_without_scanner_variation_cases_look_alike():
    cfg = SynthConfig(
        num_cases=16,
        shape=(16, 16, 16),
        radius_range=(2.0, 4.0),
        intensity_scale_range=(1.0, 1.0),
        intensity_offset_range=(0.0, 0.0),
        seed=5,
    )
    means, stds, _ = case_stats(cfg)
    assert stds.max() / stds.min() < 2
    assert means.max() - means.min() < 1


def zscored_class_distance(cfg: SynthConfig) -> np.ndarray:
    """Per case: class 1's mean minus class 2's mean after a per-case z-score (what zscore leaves)."""
    distances = []
    for i in range(cfg.num_cases):
        image, label, _ = make_case(cfg, i)
        z = (image - image.mean()) / image.std()
        distances.append(z[label == 1].mean() - z[label == 2].mean())
    return np.array(distances)


def test_non_linear_variation_survives_a_per_case_zscore():
    """Gain and offset vanish under a z-score; contrast and gamma do not: cases keep differing after it."""
    common = {"num_cases": 24, "shape": (16, 16, 16), "radius_range": (2.0, 4.0), "seed": 3}
    linear = SynthConfig(**common, contrast_range=(1, 1), gamma_range=(1, 1), noise_std=0.25, bias_field=0.15)
    varied = SynthConfig(
        **common, contrast_range=(0.5, 2.0), gamma_range=(1, 1), noise_std=0.25, bias_field=0.15
    )
    assert zscored_class_distance(varied).std() > 1.5 * zscored_class_distance(linear).std()
    # Same draws apart from the contrast: a pure gain change leaves the z-scored image unchanged.
    image, _, params = make_case(linear, 0)
    regain = SynthConfig(
        **{**common, "num_cases": 1},
        contrast_range=(1, 1),
        gamma_range=(1, 1),
        noise_std=0.25,
        bias_field=0.15,
        intensity_scale_range=(5.0, 5.0),
    )
    other, _, other_params = make_case(regain, 0)
    assert other_params["gain"] == pytest.approx(5.0) and params["gain"] != pytest.approx(5.0)
    np.testing.assert_allclose(
        (image - image.mean()) / image.std(), (other - other.mean()) / other.std(), atol=1e-4
    )


def test_per_case_parameters_are_recorded_within_their_ranges():
    cfg = SynthConfig(num_cases=12, shape=(16, 16, 16), radius_range=(2.0, 4.0), seed=2)
    params = [make_case(cfg, i)[2] for i in range(cfg.num_cases)]
    for key, (lo, hi) in {
        "contrast": cfg.contrast_range,
        "gamma": cfg.gamma_range,
        "bias_field": cfg.bias_field,
        "noise_std": cfg.noise_std,
    }.items():
        values = [p[key] for p in params]
        assert lo <= min(values) and max(values) <= hi, key
        assert max(values) - min(values) > 0.3 * (hi - lo), key  # really drawn per case


def test_objects_differ_from_local_background_in_every_case(small_cfg):
    """Learnable from local contrast: in units of the case's own background spread, class 1 is bright."""
    for i in range(small_cfg.num_cases):
        image, label, _ = make_case(small_cfg, i)
        bg = image[label == 0]
        z1 = (image[label == 1].mean() - bg.mean()) / bg.std()
        z2 = (image[label == 2].mean() - bg.mean()) / bg.std()
        assert z1 > 1 and z2 < -1, (i, z1, z2)


# ---------------------------------------------------------------------------------------------------------
# generate_dataset: refusing, atomicity


def test_generate_refuses_a_non_empty_directory(tmp_path, small_cfg):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match=str(out)):
        generate_dataset(out, small_cfg)
    assert (out / "keep.txt").read_text() == "mine"


def test_generate_into_an_empty_existing_directory(tmp_path, small_cfg):
    out = tmp_path / "out"
    out.mkdir()
    generate_dataset(out, small_cfg)
    assert (out / "dataset.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no temporary folder left behind"


def test_a_crash_leaves_no_partial_dataset(tmp_path, small_cfg, monkeypatch):
    calls = []

    def failing_save(array, affine, path):
        calls.append(path)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return original(array, affine, path)

    original = generated.save_nifti
    monkeypatch.setattr(generated, "save_nifti", failing_save)
    with pytest.raises(RuntimeError):
        generate_dataset(tmp_path / "out", small_cfg)
    assert list(tmp_path.iterdir()) == []


def test_unknown_layout_is_refused(tmp_path, small_cfg):
    with pytest.raises(UserError, match="layout"):
        generate_dataset(tmp_path / "out", small_cfg, layout="bids")


# ---------------------------------------------------------------------------------------------------------
# ensure_synthetic: caching and concurrency


def test_ensure_synthetic_generates_once_then_reuses(tmp_path, small_cfg, monkeypatch):
    root = ensure_synthetic(tmp_path, small_cfg)
    assert root == tmp_path / f"synthetic-{small_cfg.key()}"
    cases, info = find_cases("msd", root)
    assert len(cases) == small_cfg.num_cases and info.labels == {0: "background", 1: "class1", 2: "class2"}
    files = [root / "dataset.json", root / "imagesTr" / "synth_000.nii.gz"]
    before = [f.stat().st_mtime_ns for f in files]

    def must_not_run(*args, **kwargs):
        raise AssertionError("regenerated a cached dataset")

    monkeypatch.setattr(generated, "_generate_temp", must_not_run)
    assert ensure_synthetic(tmp_path, small_cfg) == root
    assert [f.stat().st_mtime_ns for f in files] == before


def test_ensure_synthetic_uses_a_new_folder_for_a_new_config(tmp_path, small_cfg):
    a = ensure_synthetic(tmp_path, small_cfg)
    b = ensure_synthetic(tmp_path, dataclasses.replace(small_cfg, seed=99))
    assert a != b and (b / "dataset.json").is_file()


def _racer(cache_root: str, cfg: SynthConfig, barrier, results) -> None:
    """Child process: generate, wait until the other one has generated too, then race for the rename."""
    original = generated._generate_temp

    def generate_then_wait(*args, **kwargs):
        tmp = original(*args, **kwargs)
        barrier.wait(timeout=60)  # both have a finished copy before either renames: a guaranteed race
        return tmp

    generated._generate_temp = generate_then_wait
    results.put(str(ensure_synthetic(Path(cache_root), cfg)))


def test_ensure_synthetic_is_safe_with_two_concurrent_processes(tmp_path, small_cfg):
    ctx = mp.get_context("spawn")  # a fresh interpreter, as two separate training jobs would be
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(str(tmp_path), small_cfg, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    paths = {results.get(timeout=5) for _ in procs}
    assert paths == {str(tmp_path / f"synthetic-{small_cfg.key()}")}
    assert [p.name for p in tmp_path.iterdir()] == [f"synthetic-{small_cfg.key()}"], "loser's copy discarded"
    cases, _ = find_cases("msd", Path(paths.pop()))
    assert len(cases) == small_cfg.num_cases


def test_air_margin_leaves_only_noise_and_no_labels_outside_the_body() -> None:
    cfg = SynthConfig(shape=(32, 32, 32), radius_range=(3.0, 5.0), air_margin=0.25, noise_std=0.3)
    image, label, case = make_case(cfg, 0)
    outside = np.ones(cfg.shape, dtype=bool)
    outside[8:24, 8:24, 8:24] = False
    assert label[outside].max() == 0 and set(np.unique(label[~outside])) == {0, 1, 2}
    air = image[outside]
    assert air.mean() == pytest.approx(case["offset"], abs=0.05 * case["gain"])  # no tissue signal
    assert air.std() == pytest.approx(case["gain"] * 0.3, rel=0.05)  # only the noise
    # Without air the same case keeps its old arrays (and cache key): the default changes nothing.
    plain = SynthConfig(shape=(32, 32, 32), radius_range=(3.0, 5.0), noise_std=0.3)
    assert (
        plain.key()
        == SynthConfig(shape=(32, 32, 32), radius_range=(3.0, 5.0), noise_std=0.3, air_margin=0).key()
    )
    with pytest.raises(UserError, match="air_margin"):
        SynthConfig(shape=(16, 16, 16), air_margin=0.3)
