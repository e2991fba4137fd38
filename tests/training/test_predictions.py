"""trainer.save_predictions: label maps per validation case and evaluation mode, on the case's own image grid.

A dataset stored in an oblique-free but non-RAS orientation (axes permuted and flipped, anisotropic voxels,
a translation) and smaller than the patch along one axis makes the pipeline reorient and pad: the written maps
must still carry the source image's affine and shape, and the truth mapped back must be the source label."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from omegaconf import OmegaConf

from norm_experiments.data.pipeline import deterministic_transforms
from norm_experiments.data.preprocessing import Preprocessing
from norm_experiments.data.synthetic import SynthConfig, generate_dataset
from norm_experiments.training.predictions import error_map, to_source_grid
from tests.helpers import metrics_of, run_cli

# Subprocess runs of the real CLI or trainings: the full suite runs them, `pytest -m "not slow"` does not.
pytestmark = pytest.mark.slow

# Voxel (i, j, k) -> world: i runs from right to left (1.5 mm), j from superior to inferior (2 mm), k from
# posterior to anterior (1 mm): an LSA-like grid that Orientationd permutes and flips.
AFFINE = np.array(
    [[-1.5, 0.0, 0.0, 30.0], [0.0, 0.0, 1.0, -12.0], [0.0, -2.0, 0.0, 40.0], [0.0, 0.0, 0.0, 1.0]]
)
MODES = ("running", "batch", "precise")


def odd_geometry_dataset(root: Path, crop: tuple[int, int, int]) -> Path:
    """A synthetic MSD-layout dataset rewritten with AFFINE and cropped to `crop` voxels."""
    cfg = SynthConfig(num_cases=4, shape=(24, 24, 24), radius_range=(3.0, 6.0), seed=3)
    generate_dataset(root, cfg, "msd")
    for path in [*root.glob("imagesTr/*.nii.gz"), *root.glob("labelsTr/*.nii.gz")]:
        data = np.asarray(nib.load(str(path)).dataobj)[: crop[0], : crop[1], : crop[2]]
        nib.save(nib.Nifti1Image(data, AFFINE), str(path))
    return root


def test_pipeline_grid_maps_back_onto_the_source_grid(tmp_path: Path) -> None:
    """The real deterministic transforms (RAS, padding to the patch), then to_source_grid: the source label
    comes back voxel for voxel."""
    root = odd_geometry_dataset(tmp_path / "data", crop=(20, 12, 24))
    data_cfg = OmegaConf.create({"pad_to_patch": True, "patch_size": [16, 16, 16]})
    prep = Preprocessing(channel_intensity=["none"], ct_statistics={}, target_spacing=None)
    label_path = sorted(root.glob("labelsTr/*.nii.gz"))[0]
    image_path = root / "imagesTr" / label_path.name
    item = deterministic_transforms(data_cfg, prep)({"image": [str(image_path)], "label": str(label_path)})
    assert item["label"].shape[1:] != (20, 12, 24)  # reoriented (and padded): not the source grid
    source = nib.load(str(label_path))
    back = to_source_grid(
        item["label"][0].as_tensor(), item["label"].affine.numpy(), source.affine, (20, 12, 24)
    )
    assert np.array_equal(back, np.asarray(source.dataobj).astype(np.uint8))


def test_error_map_values() -> None:
    truth = np.array([0, 0, 1, 1, 2, 2], dtype=np.uint8)
    predicted = np.array([0, 1, 0, 1, 1, 2], dtype=np.uint8)
    assert error_map(predicted, truth).tolist() == [0, 2, 1, 0, 3, 0]


@pytest.fixture(scope="module")
def dynunet_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The done-when command on a non-RAS dataset: DynUNet, BatchNorm at batch 1, predictions saved."""
    cwd = tmp_path_factory.mktemp("pred")
    root = odd_geometry_dataset(cwd / "data", crop=(24, 16, 24))  # no padding: the maps are what was scored
    result = run_cli(
        [
            "model=dynunet",
            "model.base_channels=8",
            "norm=batch",
            "data.batch_size=1",
            "trainer.save_predictions=true",
            "data=msd",
            f"data.root={root}",
            "data.patch_size=[16,16,16]",
            "data.val_fraction=0.5",
            "trainer.samples=4",
            "trainer.validations=1",
            "trainer.precise_bn_samples=4",
            "trainer.num_threads=1",
            "hydra.run.dir=run",
        ],
        cwd=cwd,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return cwd / "run", root


def test_one_label_map_per_case_and_mode_with_the_source_geometry(dynunet_run) -> None:
    run_dir, root = dynunet_run
    record = metrics_of(run_dir)
    index = json.loads((run_dir / "predictions" / "cases.json").read_text())
    assert len(index) == 2  # val_fraction 0.5 of 4 cases
    num_classes = len(record["val_dice_per_class"]) + 1
    for case, entry in index.items():
        image = nib.load(entry["image"][0])
        assert Path(entry["image"][0]) == root / "imagesTr" / f"{case}.nii.gz"
        truth = np.asarray(nib.load(entry["label"]).dataobj)
        for mode in MODES:
            saved = nib.load(str(run_dir / "predictions" / case / f"{mode}.nii.gz"))
            np.testing.assert_allclose(saved.affine, image.affine, atol=1e-6)
            assert saved.shape == image.shape == (24, 16, 24)
            assert saved.get_data_dtype() == np.uint8 and saved.header.get_intent()[0] == "label"
            labels = np.asarray(saved.dataobj)
            assert set(np.unique(labels)) <= set(range(num_classes))
            errors = np.asarray(
                nib.load(str(run_dir / "predictions" / case / f"{mode}_errors.nii.gz")).dataobj
            )
            assert np.array_equal(errors, error_map(labels, truth.astype(np.uint8)))


def test_saved_maps_score_what_the_run_recorded(dynunet_run) -> None:
    """Dice of the written maps against the source labels, averaged as validation averages it, equals the
    run's score in each mode: the files are the predictions that were scored."""
    run_dir, _ = dynunet_run
    record = metrics_of(run_dir)
    index = json.loads((run_dir / "predictions" / "cases.json").read_text())
    classes = list(record["val_dice_per_class"])
    for mode in MODES:
        per_class = []
        for c, name in enumerate(classes, start=1):
            scores = []
            for case, entry in index.items():
                truth = np.asarray(nib.load(entry["label"]).dataobj) == c
                pred = (
                    np.asarray(nib.load(str(run_dir / "predictions" / case / f"{mode}.nii.gz")).dataobj) == c
                )
                if truth.any():
                    scores.append(2 * (truth & pred).sum() / (truth.sum() + pred.sum()))
                    assert entry["dice"][mode][name] == pytest.approx(scores[-1], abs=1e-6)
            if scores:
                per_class.append(float(np.mean(scores)))
        assert float(np.mean(per_class)) == pytest.approx(record["eval_modes"][mode], abs=1e-6)


def test_norm_exp_check_reads_the_dynunet_planned_for_anisotropic_voxels(dynunet_run) -> None:
    """The dataset's voxels are 1 x 1.5 x 2 mm: DynUNet's plan (and so its weights' shapes) depends on them, and
    norm-exp-check plans it from the same data."""
    run_dir, root = dynunet_run
    result = run_cli(
        [
            f"weights={run_dir / 'model.pt'}",
            "model=dynunet",
            "model.base_channels=8",
            "norm=batch",
            "data=msd",
            f"data.root={root}",
            "data.patch_size=[16,16,16]",
            "data.val_fraction=0.5",
            "data.batch_size=1",
            "trainer.precise_bn_samples=4",
            "trainer.num_threads=1",
        ],
        cwd=run_dir.parent,
        module="norm_experiments.check",
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "model=dynunet" in result.stdout and "Verdict:" in result.stdout


def test_scores_count_the_cases_own_voxels_not_the_padding(tmp_path: Path) -> None:
    """A volume smaller than the patch is padded (data.pad_to_patch): a model that predicts a class everywhere,
    the padding included, was scored over the padded volume (its padding counted as false positives)."""
    import contextlib

    import torch

    from norm_experiments.data.pipeline import Volume, voxel_spacing
    from norm_experiments.training.evaluate import DICE, Inference, score_each_volume

    root = odd_geometry_dataset(tmp_path / "data", crop=(20, 12, 24))
    data_cfg = OmegaConf.create({"pad_to_patch": True, "patch_size": [16, 16, 16]})
    prep = Preprocessing(channel_intensity=["none"], ct_statistics={}, target_spacing=None)
    label_path = sorted(root.glob("labelsTr/*.nii.gz"))[0]
    item = deterministic_transforms(data_cfg, prep)(
        {"image": [str(root / "imagesTr" / label_path.name)], "label": str(label_path)}
    )
    vol = Volume("case", item, voxel_spacing(item["image"]))
    padded = tuple(item["image"].shape[1:])
    own = tuple(s.stop - s.start for s in vol.own)
    assert padded != own and sorted(own) == [12, 20, 24]  # the source's extent, reoriented
    assert vol.label[0][vol.own].sum() == vol.label[0].sum()  # the padding holds no label

    def everywhere_class_1(windows: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(windows.shape[0], 3, *windows.shape[2:])
        logits[:, 1] = 1.0
        return logits

    inf = Inference([16, 16, 16], 2, 0.25, torch.device("cpu"), contextlib.nullcontext)
    totals, _ = score_each_volume(everywhere_class_1, [vol], 3, inf)
    truth = int((vol.label[0] == 1).sum())
    expected = 2 * truth / (truth + int(np.prod(own)))  # over the case's own voxels
    assert float(totals[0, DICE, 0]) == pytest.approx(expected, rel=1e-6)


def test_an_oblique_grid_maps_back_without_losing_a_face(tmp_path: Path) -> None:
    """A rotated affine: the pipeline's grid maps back onto the source a rounding error off its first row, which
    mode="constant" filled with 0, blanking a whole slice of every saved map."""
    root = odd_geometry_dataset(tmp_path / "data", crop=(20, 22, 18))
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    label_path = sorted(root.glob("labelsTr/*.nii.gz"))[0]
    for path in (label_path, root / "imagesTr" / label_path.name):
        img = nib.load(str(path))
        affine = img.affine.copy()
        affine[:3, :3] = rotation @ affine[:3, :3]
        affine[:3, 3] = (-10.0, 5.0, 3.0)
        data = np.asarray(img.dataobj)
        if path == label_path:
            data = np.ones_like(data)  # every voxel class 1: a blanked face shows as zeros
        nib.save(nib.Nifti1Image(data, affine), str(path))
    data_cfg = OmegaConf.create({"pad_to_patch": True, "patch_size": [16, 16, 16]})
    prep = Preprocessing(channel_intensity=["none"], ct_statistics={}, target_spacing=None)
    item = deterministic_transforms(data_cfg, prep)(
        {"image": [str(root / "imagesTr" / label_path.name)], "label": str(label_path)}
    )
    source = nib.load(str(label_path))
    back = to_source_grid(
        item["label"][0].as_tensor(), item["label"].affine.numpy(), source.affine, source.shape
    )
    assert np.array_equal(back, np.asarray(source.dataobj).astype(np.uint8))
