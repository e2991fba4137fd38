"""Every bad input through the real CLI: one clear line naming the file or key, a non-zero exit, no
traceback, and nothing left behind that a resume or the report could take for a result."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from norm_experiments.data.pipeline import load_data
from norm_experiments.data.synthetic import SynthConfig, generate_dataset
from norm_experiments.errors import UserError
from tests import helpers
from tests.helpers import assert_clean_failure, compose_config, metrics_of, no_result_left, run_cli

# Subprocess runs of the real CLI or trainings: the full suite runs them, `pytest -m "not slow"` does not.
pytestmark = pytest.mark.slow

SMOKE = [*helpers.SMOKE, "data=msd"]  # every test here brings its own dataset
VAL = ["data.val_cases=[synth_004,synth_005]"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = SynthConfig(num_cases=6, shape=(24, 24, 24), radius_range=(3.0, 6.0), seed=3)
    return generate_dataset(tmp_path_factory.mktemp("pristine") / "msd", cfg, "msd")


def _image(root: Path, i: int = 1) -> Path:
    return root / "imagesTr" / f"synth_{i:03d}.nii.gz"


def _label(root: Path, i: int = 1) -> Path:
    return root / "labelsTr" / f"synth_{i:03d}.nii.gz"


def _resave(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> None:
    old = nib.load(str(path))
    nib.save(nib.Nifti1Image(array, old.affine if affine is None else affine), str(path))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _shape_mismatch(root: Path) -> None:
    _resave(_label(root), np.zeros((24, 24, 20), np.uint8))


def _affine_mismatch(root: Path) -> None:
    label = nib.load(str(_label(root)))
    _resave(_label(root), np.asarray(label.dataobj), np.diag([3.0, 3.0, 3.0, 1.0]))


def _label_out_of_range(root: Path) -> None:
    label = np.asarray(nib.load(str(_label(root))).dataobj).copy()
    label[0, 0, 0] = 7
    _resave(_label(root), label)


def _non_integer_label(root: Path) -> None:
    label = np.asarray(nib.load(str(_label(root))).dataobj).astype(np.float32)
    label[0, 0, 0] = 0.5
    _resave(_label(root), label)


def _nan_voxel(root: Path) -> None:
    image = np.asarray(nib.load(str(_image(root))).dataobj).copy()
    image[3, 3, 3] = np.nan
    _resave(_image(root), image)


def _image_2d(root: Path) -> None:
    _resave(_image(root), np.zeros((24, 24), np.float32))


def _extreme_voxels(value: float, case: int) -> Callable[[Path], None]:
    """A few finite voxels far outside the image's range (3e38 used to become NaN after z-scoring, 1e30
    to squash the rest of the volume to a constant)."""

    def apply(root: Path) -> None:
        image = np.asarray(nib.load(str(_image(root, case))).dataobj).astype(np.float32)
        image[2, 3, 4] = image[5, 6, 7] = image[8, 9, 10] = value
        _resave(_image(root, case), image)

    return apply


def _flipped_label_axis(root: Path) -> None:
    label = nib.load(str(_label(root)))
    affine = label.affine.copy()
    affine[0, 0] = -affine[0, 0]
    _resave(_label(root), np.asarray(label.dataobj), affine)


def _background_only(cases: range) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        for i in cases:
            _resave(_label(root, i), np.zeros(nib.load(str(_label(root, i))).shape, np.uint8))

    return apply


def _json_edit(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        meta = json.loads((root / "dataset.json").read_text())
        edit(meta)
        (root / "dataset.json").write_text(json.dumps(meta))

    return apply


def _malformed_json(root: Path) -> None:
    (root / "dataset.json").write_text('{"training": [')


def _duplicate(meta: dict) -> None:
    meta["training"].append(dict(meta["training"][0]))


CASES = [
    ("missing image", lambda r: _image(r).unlink(), [], "imagesTr/synth_001.nii.gz"),
    ("missing label", lambda r: _label(r).unlink(), [], "labelsTr/synth_001.nii.gz"),
    ("truncated gz", lambda r: _truncate(_image(r)), [], "imagesTr/synth_001.nii.gz"),
    ("shape mismatch", _shape_mismatch, [], "synth_001"),
    ("affine mismatch", _affine_mismatch, [], "synth_001"),
    ("label outside classes", _label_out_of_range, [], "labelsTr/synth_001.nii.gz"),
    ("non-integer label", _non_integer_label, [], "labelsTr/synth_001.nii.gz"),
    ("NaN voxel", _nan_voxel, [], "imagesTr/synth_001.nii.gz"),
    ("2D image", _image_2d, [], "imagesTr/synth_001.nii.gz"),
    ("1e30 voxels", _extreme_voxels(1e30, 4), VAL, "imagesTr/synth_004.nii.gz: holds extreme intensities"),
    (
        "3e38 voxels, files not checked",
        _extreme_voxels(3e38, 4),
        [*VAL, "data.check_files=false", "data.intensity=zscore"],
        "imagesTr/synth_004.nii.gz: 13824 voxels are NaN or infinite after preprocessing",  # all: std is inf
    ),
    ("flipped label axis", _flipped_label_axis, [], "labelsTr/synth_001.nii.gz: voxel grid differs"),
    ("all-background labels", _background_only(range(6)), [], "the training split (4 case(s)"),
    ("validation without foreground", _background_only(range(4, 6)), VAL, "the validation split (2 case(s)"),
    ("malformed dataset.json", _malformed_json, [], "dataset.json"),
    ("missing labels key", _json_edit(lambda m: m.pop("labels")), [], "labels"),
    ("duplicate case", _json_edit(_duplicate), [], "synth_000"),
    ("empty validation split", lambda r: None, ["data.val_fraction=0.01"], "data.val_fraction"),
    ("impossible group count", lambda r: None, ["norm=group", "norm.options.num_groups=5"], "num_groups"),
    (
        "patch larger than a case",
        lambda r: None,
        ["data.patch_size=[64,64,64]", "data.pad_to_patch=false"],
        "data.patch_size",
    ),
]


@pytest.mark.parametrize(("what", "corrupt", "overrides", "needle"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(
    pristine: Path, tmp_path: Path, what, corrupt, overrides, needle
) -> None:
    root = tmp_path / "data"
    shutil.copytree(pristine, root)
    corrupt(root)
    result = run_cli([*SMOKE, f"data.root={root}", *overrides, "hydra.run.dir=run"], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-2000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], output[-2000:]
    run_dir = tmp_path / "run"
    assert not (run_dir / "model.pt").exists() and not (run_dir / "checkpoint.pt").exists()
    if (run_dir / "metrics.json").exists():  # allowed only as an honest failure record
        assert metrics_of(run_dir)["status"] == "failed"


def test_synthetic_cache_that_cannot_be_written(tmp_path: Path) -> None:
    """NORM_EXP_CACHE naming a file (a read-only home fails the same way, except for root, who may write)."""
    cache = tmp_path / "not_a_folder"
    cache.write_text("x")
    args = ["experiment=smoke", "data.synthetic.seed=91", "hydra.run.dir=run"]
    result = run_cli(args, cwd=tmp_path, env={"NORM_EXP_CACHE": str(cache)})
    assert_clean_failure(
        result, f"error: {cache}: cannot write the synthetic dataset there", "data.cache_dir"
    )
    assert len(result.stderr.strip().splitlines()) == 1 and no_result_left(tmp_path)
    assert cache.read_text() == "x"


# In process (load_data is what the CLI runs; the test above shows the CLI's exit path).


def test_synthetic_cache_dir_inside_a_file(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("x")
    cfg = compose_config(["experiment=smoke", f"data.cache_dir={tmp_path / 'a_file' / 'cache'}"])
    with pytest.raises(
        UserError, match=r"a_file/cache: cannot write the synthetic dataset there .*data\.cache_dir"
    ):
        load_data(cfg.data)


def test_target_spacing_in_metres(pristine: Path) -> None:
    """24 voxels of 1.5 mm resampled to 0.0015 "mm" become 24000: more than any machine's memory."""
    cfg = compose_config([*SMOKE, f"data.root={pristine}", "data.target_spacing=[0.0015,0.0015,0.002]"])
    with pytest.raises(UserError) as err:
        load_data(cfg.data)
    assert str(err.value).startswith(
        "data.target_spacing=[0.0015, 0.0015, 0.002]: resampled to it, the dataset"
    )
    assert "(synth_000: 24000x24000x24000 voxels)" in str(err.value) and "spacings are in mm" in str(
        err.value
    )


def test_unwritable_output_dir(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    result = run_cli(["experiment=smoke", f"hydra.run.dir={tmp_path / 'a_file' / 'run'}"], cwd=tmp_path)
    assert_clean_failure(result)
    assert "a_file" in result.stderr


def test_full_disk_while_saving_a_checkpoint(pristine: Path, tmp_path: Path) -> None:
    """A full disk is simulated with a file-size limit (RLIMIT_FSIZE): small files still fit, the
    checkpoint does not. The run must fail cleanly and leave no partial checkpoint behind."""
    run_dir = tmp_path / "run"

    def small_files_only() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (48 * 1024, 48 * 1024))

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "norm_experiments.train",
            *SMOKE,
            f"data.root={pristine}",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=small_files_only,
    )
    assert_clean_failure(result)
    assert "could not write" in result.stderr and ".pt" in result.stderr
    assert not (run_dir / "checkpoint.pt").exists() and not (run_dir / "model.pt").exists()
    assert not list(run_dir.glob(".*.tmp"))  # the temporary file was removed
    assert metrics_of(run_dir)["status"] == "failed"


def test_class_absent_from_every_validation_case_is_left_out_of_the_mean(
    pristine: Path, tmp_path: Path
) -> None:
    """It used to count as Dice 0 in the mean: a wrong number that looked valid."""
    root = tmp_path / "data"
    shutil.copytree(pristine, root)
    for i in (4, 5):  # the validation cases below: no class 2 in either
        label = np.asarray(nib.load(str(_label(root, i))).dataobj).copy()
        assert (label == 2).any()
        label[label == 2] = 0
        _resave(_label(root, i), label)
    args = [*SMOKE, f"data.root={root}", "data.val_cases=[synth_004,synth_005]", "hydra.run.dir=run"]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "class(es) class2 absent from every validation case" in result.stdout + result.stderr
    metrics = metrics_of(tmp_path / "run")
    assert metrics["absent_classes"] == ["class2"]
    assert metrics["val_dice_per_class"]["class2"] is None and metrics["val_hd95_per_class"]["class2"] is None
    assert metrics["val_dice"] == pytest.approx(metrics["val_dice_per_class"]["class1"])
    assert metrics["val_hd95"] == pytest.approx(metrics["val_hd95_per_class"]["class1"])


def test_target_spacing_in_mm_over_files_in_metres_names_the_spacing_not_the_labels(
    pristine: Path, tmp_path
) -> None:
    """Affines in metres with a mm target: every case shrank to about one voxel, and the error blamed the labels
    ("the training split has no foreground voxel")."""

    metres = tmp_path / "metres"
    shutil.copytree(pristine, metres)
    for path in sorted(metres.rglob("*.nii.gz")):
        img = nib.load(path)
        affine = img.affine.copy()
        affine[:3, :3] /= 1000
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), path)
    cfg = compose_config([*SMOKE, f"data.root={metres}", "data.target_spacing=[1.5,1.5,1.5]"])
    with pytest.raises(UserError) as err:
        load_data(cfg.data)
    assert str(err.value).startswith(
        "data.target_spacing=[1.5, 1.5, 1.5]: resampled to it, case synth_000 shrinks from 24x24x24 to 1x1x1 "
        "voxels; its file says (0.0015, 0.0015, 0.002) mm per voxel: spacings are in mm"
    ), str(err.value)
