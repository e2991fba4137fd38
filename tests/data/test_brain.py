"""The brain-anatomy dataset: built from the MNI152 template nilearn ships, labels deformed with the image, real
NIfTI in the MSD layout, cached by its parameters, and trained on through the real entry point."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from norm_experiments.data import brain, generated
from norm_experiments.data.brain import BrainConfig, anatomy, ensure_brain, make_case, output_grid
from norm_experiments.data.layouts import find_cases
from norm_experiments.errors import UserError
from tests.helpers import metrics_of, run_cli

# 6 mm: a coarse but complete brain (about 26 x 32 x 27 voxels), fast enough for every test below.
SMALL = BrainConfig(num_cases=4, spacing=6.0)
WM_LEVEL = 0.9  # template T1 in white-matter units: white matter is above it, grey matter below


def _agreement(t1: np.ndarray, label: np.ndarray) -> float:
    """How well the image supports the labels: the share of white-matter voxels brighter than WM_LEVEL minus
    the share of grey-matter voxels that are. Near 0 for labels that do not sit on the image."""
    return float((t1[label == 2] > WM_LEVEL).mean() - (t1[label == 1] > WM_LEVEL).mean())


def test_labels_move_with_the_image_in_every_case() -> None:
    for index in range(3):
        rng = np.random.default_rng([SMALL.seed, index])
        t1, label, params = anatomy(SMALL, rng)
        assert abs(params["rotation_deg_x"]) > 0 and params["scale_y"] != 1.0  # each case is deformed
        assert _agreement(t1, label) > 0.5
        # The same check fails for labels moved 2 voxels (12 mm) off the image: it can detect misalignment.
        assert _agreement(t1, np.roll(label, 2, axis=0)) < 0.5 * _agreement(t1, label)


def test_cases_differ_in_anatomy_and_scanner_but_share_the_grid() -> None:
    (img0, lab0, p0), (img1, lab1, p1) = make_case(SMALL, 0), make_case(SMALL, 1)
    shape, _ = output_grid(SMALL.spacing)
    assert img0.shape == img1.shape == lab0.shape == shape and img0.dtype == np.float32
    assert (lab0 != lab1).mean() > 0.05  # different anatomy
    assert p0["gain"] != p1["gain"] and p0["gamma"] != p1["gamma"]
    again = make_case(SMALL, 0)
    assert np.array_equal(again[0], img0) and np.array_equal(again[1], lab0)  # a pure function


def test_written_dataset_is_real_nifti_with_labels_0_to_2_and_every_class_in_every_case(tmp_path) -> None:
    root = ensure_brain(tmp_path, SMALL)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "grey_matter", "2": "white_matter"}
    assert "MNI ICBM152 2009" in meta["brain"]["source"] and "McGill" in meta["brain"]["licence"]
    cases, info = find_cases("msd", root)
    assert len(cases) == SMALL.num_cases and info.modalities == ("MRI",)
    _, affine = output_grid(SMALL.spacing)
    for entry in meta["training"]:
        image = nib.load(str(root / entry["image"]))
        label = nib.load(str(root / entry["label"]))
        assert np.allclose(image.affine, affine) and np.allclose(label.affine, affine)  # same world geometry
        assert image.shape == label.shape
        values = np.unique(np.asarray(label.dataobj))
        assert values.tolist() == [0, 1, 2]  # only 0..K, and every class present


def test_cached_dataset_is_reused_and_a_new_config_gets_a_new_folder(tmp_path, monkeypatch) -> None:
    root = ensure_brain(tmp_path, SMALL)
    stamp = (root / "dataset.json").stat().st_mtime_ns

    def must_not_run(*args, **kwargs):
        raise AssertionError("regenerated a cached dataset")

    monkeypatch.setattr(generated, "_generate_temp", must_not_run)
    assert ensure_brain(tmp_path, SMALL) == root and (root / "dataset.json").stat().st_mtime_ns == stamp
    monkeypatch.undo()
    other = ensure_brain(tmp_path, BrainConfig(num_cases=4, spacing=6.0, seed=1))
    assert other != root and other.name == f"brain-{BrainConfig(num_cases=4, spacing=6.0, seed=1).key()}"


def test_bad_parameters_and_a_missing_template_are_one_line(monkeypatch) -> None:
    with pytest.raises(UserError, match="brain data: spacing=0.1"):
        BrainConfig(spacing=0.1)
    with pytest.raises(UserError, match="bias_field"):
        BrainConfig(bias_field=(0.5, 0.2))
    monkeypatch.setattr(brain.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install nilearn"):
        brain.template_folder()


def test_cli_writes_the_dataset_for_inspection(tmp_path, capsys) -> None:
    brain.main([str(tmp_path / "b"), "--cases", "2", "--spacing", "6", "--layout", "folder"])
    assert "wrote 2 brain cases" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "b" / "images").iterdir()) == [
        "brain_000.nii.gz",
        "brain_001.nii.gz",
    ]
    assert (tmp_path / "b" / "brain.json").is_file()


@pytest.mark.slow  # a subprocess of the real CLI
def test_training_on_brain_anatomy_through_the_real_entry_point(tmp_path) -> None:
    """What the issue's user types, at a test's size: BatchNorm at batch 1 on the brain data, all three
    evaluation modes in metrics.json, the record naming the dataset; a second run reuses the cached data."""
    small = [
        "data=brain",
        "data.brain.num_cases=4",
        "data.brain.spacing=6.0",
        "data.patch_size=[16,16,16]",
        "data.val_fraction=0.25",
        "model.depth=2",
        "trainer.samples=8",
        "trainer.validations=1",
        "trainer.precise_bn_samples=2",
        "trainer.progress=none",
        "norm=batch",
        "data.batch_size=1",
    ]
    cache = {"NORM_EXP_CACHE": str(tmp_path / "cache")}
    first = run_cli(small, cwd=tmp_path, env=cache)
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    metrics = metrics_of(run_dir)
    assert metrics["status"] == "completed" and metrics["dataset"] == "brain"
    assert metrics["intensity"] == "zscore"  # the preset's standard MR preprocessing
    assert set(metrics["eval_modes"]) == {"running", "precise", "batch"}
    assert set(metrics["val_dice_per_class"]) == {"grey_matter", "white_matter"}
    (dataset,) = (tmp_path / "cache").glob("brain-*/dataset.json")
    stamp = dataset.stat().st_mtime_ns
    second = run_cli([*small, "seed=1"], cwd=tmp_path, env=cache)
    assert second.returncode == 0, second.stderr[-3000:]
    assert list((tmp_path / "cache").glob("brain-*/dataset.json")) == [dataset]
    assert dataset.stat().st_mtime_ns == stamp  # reused, not regenerated
