"""check_case: every kind of bad file gives one UserError line naming the file."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from norm_experiments.data.checks import check_case, check_cases
from norm_experiments.data.layouts import find_cases
from norm_experiments.errors import UserError

from .conftest import write_nifti

IMAGE = "imagesTr/synth_001.nii.gz"
LABEL = "labelsTr/synth_001.nii.gz"


@pytest.fixture
def dataset(make_dataset):
    """(root, cases, info) of a fresh 3-case msd dataset; tests damage case 1 (synth_001)."""
    root = make_dataset()
    cases, info = find_cases("msd", root)
    return root, cases, info


def load(root: Path, rel: str) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(root / rel)
    return np.asarray(img.dataobj), img.affine


def expect_error(cases, info, pattern: str) -> str:
    with pytest.raises(UserError, match=pattern) as err:
        check_cases(cases, info)
    message = str(err.value)
    assert "\n" not in message, "one line"
    return message


def test_a_sound_dataset_passes(dataset):
    _, cases, info = dataset
    check_cases(cases, info)
    check_case(cases[0], info, affine_tol=0.0)


def test_missing_image_file(dataset):
    root, cases, info = dataset
    (root / IMAGE).unlink()
    expect_error(cases, info, rf"^{IMAGE}: image file not found$")


def test_missing_label_file(dataset):
    root, cases, info = dataset
    (root / LABEL).unlink()
    expect_error(cases, info, rf"^{LABEL}: label file not found$")


@pytest.mark.parametrize("keep", [0.5, 0.9, 200])
def test_truncated_gz(dataset, keep):
    root, cases, info = dataset
    path = root / IMAGE
    data = path.read_bytes()
    cut = int(len(data) * keep) if keep < 1 else keep
    path.write_bytes(data[:cut])
    expect_error(cases, info, rf"^{IMAGE}: (truncated or corrupt file|not a readable NIfTI file) \(")


def test_not_gzip_at_all(dataset):
    root, cases, info = dataset
    (root / LABEL).write_bytes(b"this is not a NIfTI file" * 20)
    expect_error(cases, info, rf"^{LABEL}: (not a readable NIfTI file|truncated or corrupt file)")


def test_corrupt_payload_inside_valid_gzip(dataset):
    root, cases, info = dataset
    raw = gzip.decompress((root / IMAGE).read_bytes())
    (root / IMAGE).write_bytes(gzip.compress(raw[: len(raw) // 2]))  # a valid gzip of half a volume
    expect_error(cases, info, rf"^{IMAGE}: truncated or corrupt file")


def test_shape_mismatch(dataset):
    root, cases, info = dataset
    label, affine = load(root, LABEL)
    write_nifti(root / LABEL, label[:, :, :-2], spacing=np.diag(affine)[:3])
    msg = expect_error(
        cases, info, rf"^{LABEL}: spatial shape \(16, 16, 14\) differs from {IMAGE} \(16, 16, 16\)"
    )
    assert msg.count(":") == 1


def test_affine_mismatch(dataset):
    root, cases, info = dataset
    label, _ = load(root, LABEL)
    write_nifti(root / LABEL, label, spacing=(1.0, 1.5, 2.0))
    # 16 voxels along x: the far corner moves 15 x 0.5 mm
    expect_error(
        cases,
        info,
        rf"^{LABEL}: voxel grid differs from {IMAGE}'s \(voxel centres up to 7\.5 mm apart in world space\): "
        r"spacing \(1\.0, 1\.5, 2\.0\) vs \(1\.5, 1\.5, 2\.0\) mm$",
    )


def _resave_affine(root: Path, rel: str, affine: np.ndarray, flip_axis: int | None = None) -> None:
    data, _ = load(root, rel)
    if flip_axis is not None:
        data = np.flip(data, axis=flip_axis).copy()
    nib.save(nib.Nifti1Image(data, affine), str(root / rel))


def test_flipped_axis_is_called_a_direction_difference(dataset):
    """It used to be called an origin difference."""
    root, cases, info = dataset
    _, affine = load(root, LABEL)
    flipped = affine.copy()
    flipped[0, 0] = -flipped[0, 0]  # same origin, x axis pointing the other way: another region of space
    _resave_affine(root, LABEL, flipped)
    message = expect_error(
        cases, info, rf"^{LABEL}: voxel grid differs from {IMAGE}'s .*: direction LAS vs RAS$"
    )
    assert "origin" not in message and "spacing" not in message


def test_shifted_origin_is_an_origin_difference(dataset):
    root, cases, info = dataset
    _, affine = load(root, LABEL)
    shifted = affine.copy()
    shifted[:3, 3] += [0.0, 3.0, 4.0]
    _resave_affine(root, LABEL, shifted)
    expect_error(
        cases,
        info,
        rf"^{LABEL}: voxel grid differs .*up to 5 mm apart.*: origin \(0\.0, 3\.0, 4\.0\) vs \(0\.0, 0\.0, 0\.0\) mm$",
    )


def test_axis_stored_flipped_with_its_affine_saying_so_is_the_same_grid(dataset):
    """Compared in world space: the same voxels stored in the other order along x (the affine's x axis
    negated and its origin at the former last voxel) are the same grid, which the loader reorients."""
    root, cases, info = dataset
    _, affine = load(root, LABEL)
    n = nib.load(root / LABEL).shape[0]
    flipped = affine.copy()
    flipped[:3, 0] = -affine[:3, 0]
    flipped[:3, 3] = affine[:3, 3] + (n - 1) * affine[:3, 0]
    _resave_affine(root, LABEL, flipped, flip_axis=0)
    check_cases(cases, info)


@pytest.mark.parametrize("extreme", [1e30, 3e38, -1e12])
def test_extreme_finite_intensities(dataset, extreme):
    """A few such voxels used to pass, then turn a z-scored volume into NaN or squash it to a constant."""
    root, cases, info = dataset
    image, affine = load(root, IMAGE)
    image = image.astype(np.float32)
    image[1, 2, 3] = image[4, 5, 6] = extreme
    write_nifti(root / IMAGE, image, spacing=np.diag(affine)[:3])
    expect_error(
        cases, info, rf"^{IMAGE}: holds extreme intensities \(from .* while 99\.8% of its voxels lie in"
    )


def test_a_wide_but_real_intensity_range_passes(dataset):
    """CT-like: air at -1024, bone at 3071, soft tissue around 40, a few metal voxels at 30000."""
    root, cases, info = dataset
    image, affine = load(root, IMAGE)
    rng = np.random.default_rng(0)
    ct = rng.normal(40, 30, image.shape).astype(np.int16)
    ct[:4] = -1024
    ct[-2:, :4] = 3071
    ct[8, 8, 8] = 30000
    write_nifti(root / IMAGE, ct, spacing=np.diag(affine)[:3])
    check_cases(cases, info)


def test_affine_within_tolerance_passes(dataset):
    root, cases, info = dataset
    label, _ = load(root, LABEL)
    write_nifti(root / LABEL, label, spacing=(1.5 + 1e-5, 1.5, 2.0))
    check_cases(cases, info)


def test_label_value_outside_declared_classes(dataset):
    root, cases, info = dataset
    label, affine = load(root, LABEL)
    label[0, 0, 0] = 3
    write_nifti(root / LABEL, label, spacing=np.diag(affine)[:3])
    expect_error(
        cases,
        info,
        rf"^{LABEL}: label values \{{3\}} are not among the declared classes \{{0, 1, 2\}} "
        r"\(dataset\.json 'labels'\)$",
    )


def test_non_integer_label_values(dataset):
    root, cases, info = dataset
    label, affine = load(root, LABEL)
    label = label.astype(np.float32)
    label[1, 2, 3] = 0.5
    write_nifti(root / LABEL, label, spacing=np.diag(affine)[:3])
    expect_error(cases, info, rf"^{LABEL}: label has non-integer values \(e\.g\. 0\.5\)")


def test_float_labels_with_whole_values_pass(dataset):
    root, cases, info = dataset
    label, affine = load(root, LABEL)
    write_nifti(root / LABEL, label.astype(np.float32), spacing=np.diag(affine)[:3])
    check_cases(cases, info)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_voxel(dataset, bad):
    root, cases, info = dataset
    image, affine = load(root, IMAGE)
    image[3, 4, 5] = bad
    write_nifti(root / IMAGE, image, spacing=np.diag(affine)[:3])
    expect_error(cases, info, rf"^{IMAGE}: image has 1 NaN or infinite voxels$")


@pytest.mark.parametrize("shape", [(16, 16), (16, 16, 1)])
def test_2d_image(dataset, shape):
    root, cases, info = dataset
    write_nifti(root / IMAGE, np.zeros(shape, np.float32), spacing=(1.5, 1.5, 2.0))
    expect_error(cases, info, rf"^{IMAGE}: image is 2D \(shape {re_tuple(shape)}\); expected a 3D volume$")


def re_tuple(shape: tuple[int, ...]) -> str:
    return str(shape).replace("(", r"\(").replace(")", r"\)")


def test_wrong_channel_count(dataset):
    root, cases, info = dataset
    image, affine = load(root, IMAGE)
    write_nifti(root / IMAGE, np.stack([image, image], axis=-1), spacing=np.diag(affine)[:3])
    expect_error(
        cases, info, rf"^{IMAGE}: has 2 input channel\(s\) but the dataset has 1 \(dataset\.json 'modality'\)"
    )


def test_channel_files_with_different_shapes(tmp_path):
    from .test_layouts import make_nnunet_two_channel

    root = make_nnunet_two_channel(tmp_path)
    cases, info = find_cases("nnunet", root)
    bad = "imagesTr/brain_a_0001.nii.gz"
    write_nifti(root / bad, np.zeros((12, 12, 8), np.float32))
    expect_error(
        cases, info, rf"^{bad}: spatial shape \(12, 12, 8\) differs from imagesTr/brain_a_0000\.nii\.gz"
    )


def test_folder_layout_names_data_labels(make_dataset):
    root = make_dataset("folder")
    cases, info = find_cases("folder", root)  # default classes {0, 1}; the synthetic data has class 2
    message = expect_error(
        cases,
        info,
        r"^labels/synth_000\.nii\.gz: label values \{2\} .*\(data\.labels\); "
        r"e\.g\. 'data\.labels=\{0:background,1:foreground,2:class2\}'$",
    )
    # The example is an override that works: the dataset passes with the classes it declares.
    from tests.helpers import compose_config

    example = message.split("e.g. '")[1].rstrip("'")
    cfg = compose_config(["data=folder", f"data.root={root}", example])
    cases, info = find_cases("folder", root, labels=dict(cfg.data.labels))
    check_cases(cases, info)
    assert info.labels == {0: "background", 1: "foreground", 2: "class2"}


def test_stops_at_the_first_bad_case(dataset):
    root, cases, info = dataset
    (root / "imagesTr/synth_002.nii.gz").unlink()
    (root / IMAGE).unlink()
    expect_error(cases, info, rf"^{IMAGE}")


@pytest.mark.parametrize("what", ["complex", "rgb"])
def test_voxels_that_are_not_one_real_number(dataset, what):
    """Complex voxels used to pass (their imaginary part silently dropped), RGB ones crashed the loader."""
    root, cases, info = dataset
    image, affine = load(root, IMAGE)
    if what == "complex":
        data = image.astype(np.complex64)
    else:
        data = np.zeros(image.shape, np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")]))
    nib.save(nib.Nifti1Image(data, affine), str(root / IMAGE))
    expect_error(cases, info, rf"^{IMAGE}: image voxels are of type .* \(complex or RGB\); expected one real")


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("nan", "holds NaN or infinite values"),
        ("zero", r"is singular \(a voxel spacing of 0\)"),
    ],
)
def test_an_unusable_affine_is_one_line_naming_the_file(dataset, bad: str, why: str):
    """A NaN sform crashed resampling (LinAlgError) and saving predictions at the end of training; an all-zero
    one trained and recorded HD95 from a voxel spacing of 0."""
    root, cases, info = dataset
    image, affine = load(root, IMAGE)
    header = nib.Nifti1Image(image, affine).header.copy()  # the fields as a broken tool writes them
    header["qform_code"], header["sform_code"] = 0, 1
    for row in ("srow_x", "srow_y", "srow_z"):
        header[row][:3] = 0.0
    if bad == "nan":
        header["srow_x"][0] = np.nan
    nib.save(nib.Nifti1Image(image, None, header), str(root / IMAGE))
    expect_error(
        cases,
        info,
        rf"^{IMAGE}: its affine \(the header's voxel-to-world matrix\) {why}; fix the sform/qform$",
    )


def test_an_axis_of_length_0_is_one_line(dataset):
    """(0, 24, 24) ended in an internal error (IndexError) in the intensity check."""
    root, cases, info = dataset
    write_nifti(root / IMAGE, np.zeros((0, 16, 16), np.float32), spacing=(1.5, 1.5, 2.0))
    expect_error(
        cases,
        info,
        rf"^{IMAGE}: image has an axis of length 0 \(shape \(0, 16, 16\)\); expected a 3D volume$",
    )


def test_a_training_case_without_foreground_is_said_once_not_at_every_draw(caplog):
    """MONAI's cropper warned "Num foregrounds 0 ..." (two lines of its source) at each draw of such a case."""
    import logging
    import subprocess
    import sys
    import types

    import torch

    from norm_experiments.data.checks import check_preprocessed

    def volume(name: str, foreground: bool) -> types.SimpleNamespace:
        label = torch.zeros(1, 8, 8, 8)
        label[0, 2, 2, 2] = float(foreground)
        return types.SimpleNamespace(name=name, image=torch.zeros(1, 8, 8, 8), label=label)

    splits = {"training": [volume("a", True), volume("empty", False)], "validation": [volume("v", True)]}
    with caplog.at_level(logging.INFO, logger="norm_experiments"):
        check_preprocessed(splits, {}, {})
    said = [r.getMessage() for r in caplog.records if "without foreground" in r.getMessage()]
    assert said == ["training cases without foreground (their patches are all centred on background): empty"]
    # In a process of its own, as training runs (pytest resets warning filters around each test).
    code = (
        "import numpy as np; from norm_experiments.data.patches import Augmentation; "
        "d = Augmentation((4, 4, 4), 0.5, 0.0, 0.0).draw(np.random.RandomState(0), (8, 8, 8), "
        "np.array([], dtype=np.int64), np.arange(512), 4); print(len(d))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "4", result.stderr
    assert "Num foregrounds" not in result.stderr, result.stderr


@pytest.mark.parametrize("value", [255, -1])
def test_label_values_that_cannot_be_classes_ask_for_a_remap_not_a_declaration(make_dataset, value):
    """A 0/255 mask: the example override declaring 255 was refused in turn (classes are 0..K-1)."""
    root = make_dataset("folder")
    for path in sorted((root / "labels").iterdir()):
        img = nib.load(path)
        data = np.asarray(img.dataobj).astype(np.int16)
        data[data > 0] = value
        nib.save(nib.Nifti1Image(data, img.affine), path)
    cases, info = find_cases("folder", root)
    message = expect_error(cases, info, rf"label values \{{{value}\}} are not among the declared classes")
    assert "e.g. 'data.labels=" not in message
    assert message.endswith(
        "data.labels cannot declare them: the classes must be the consecutive values 0..K-1, so remap the label "
        "files to those (a 0/255 mask: 255 -> 1)"
    )
