"""find_cases for every layout (and what it refuses), and the train/validation split."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from norm_experiments.data.checks import check_cases
from norm_experiments.data.layouts import Case, find_cases, split_cases
from norm_experiments.errors import UserError

from .conftest import write_nifti

NAMES = ["synth_000", "synth_001", "synth_002"]
SYNTH_LABELS = {0: "background", 1: "class1", 2: "class2"}


def volume(seed: int, shape=(12, 12, 10), channels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    full = shape if channels is None else (*shape, channels)
    image = rng.normal(size=full).astype(np.float32)
    label = (rng.random(shape) > 0.7).astype(np.uint8)
    return image, label


def write_json(path: Path, content: object) -> None:
    path.write_text(json.dumps(content))


# ---------------------------------------------------------------------------------------------------------
# Layouts that work


def test_msd_generated(make_dataset):
    root = make_dataset("msd")
    cases, info = find_cases("msd", root)
    assert [c.name for c in cases] == NAMES
    assert cases[0].images == (root / "imagesTr" / "synth_000.nii.gz",)
    assert cases[0].label == root / "labelsTr" / "synth_000.nii.gz"
    assert (info.root, info.layout, info.num_channels, info.labels) == (root, "msd", 1, SYNTH_LABELS)
    check_cases(cases, info)


def test_nnunet_generated(make_dataset):
    root = make_dataset("nnunet")
    cases, info = find_cases("nnunet", root)
    assert [c.name for c in cases] == NAMES
    assert cases[1].images == (root / "imagesTr" / "synth_001_0000.nii.gz",)
    assert cases[1].label == root / "labelsTr" / "synth_001.nii.gz"
    assert (info.layout, info.num_channels, info.labels) == ("nnunet", 1, SYNTH_LABELS)
    check_cases(cases, info)


def test_folder_generated_with_default_and_given_labels(make_dataset):
    root = make_dataset("folder")
    cases, info = find_cases("folder", root)
    assert [c.name for c in cases] == NAMES
    assert info.labels == {0: "background", 1: "foreground"}, "documented default"
    assert info.num_channels == 1
    for labels in (
        {0: "background", 1: "a", 2: "b"},
        {"0": "background", "1": "a", "2": "b"},
        ["background", "a", "b"],
    ):
        _, info = find_cases("folder", root, labels=labels)
        assert info.labels == {0: "background", 1: "a", 2: "b"}
    check_cases(cases, info)


def make_nnunet_two_channel(root: Path) -> Path:
    for i, name in enumerate(["brain_b", "brain_a"]):
        image, label = volume(i, channels=2)
        write_nifti(root / "imagesTr" / f"{name}_0000.nii.gz", image[..., 0])
        write_nifti(root / "imagesTr" / f"{name}_0001.nii.gz", image[..., 1])
        write_nifti(root / "labelsTr" / f"{name}.nii.gz", label)
    (root / "imagesTr" / "._brain_a_0000.nii.gz").write_bytes(b"macOS resource fork")  # must be ignored
    write_json(
        root / "dataset.json",
        {
            "channel_names": {"0": "T1", "1": "FLAIR"},
            "labels": {"background": 0, "lesion": 1},
            "numTraining": 2,
            "file_ending": ".nii.gz",
        },
    )
    return root


def test_nnunet_two_channels_by_hand(tmp_path):
    root = make_nnunet_two_channel(tmp_path)
    cases, info = find_cases("nnunet", root)
    assert [c.name for c in cases] == ["brain_a", "brain_b"]
    assert [p.name for p in cases[0].images] == ["brain_a_0000.nii.gz", "brain_a_0001.nii.gz"]
    assert info.num_channels == 2 and info.labels == {0: "background", 1: "lesion"}
    check_cases(cases, info)


def make_msd_4d(root: Path, with_modality: bool = True) -> Path:
    training = []
    for i, name in enumerate(["BRATS_002", "BRATS_001"]):
        image, label = volume(i, channels=2)
        write_nifti(root / "imagesTr" / f"{name}.nii.gz", image)
        write_nifti(root / "labelsTr" / f"{name}.nii.gz", label)
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    meta = {"name": "BRATS", "labels": {"0": "background", "1": "tumour"}, "training": training}
    if with_modality:
        meta["modality"] = {"0": "FLAIR", "1": "T1w"}
    write_json(root / "dataset.json", meta)
    return root


@pytest.mark.parametrize("with_modality", [True, False])
def test_msd_4d_multichannel(tmp_path, with_modality):
    root = make_msd_4d(tmp_path, with_modality)
    cases, info = find_cases("msd", root)
    assert [c.name for c in cases] == ["BRATS_001", "BRATS_002"]
    assert len(cases[0].images) == 1
    assert info.num_channels == 2
    check_cases(cases, info)


def test_folder_4d_multichannel(tmp_path):
    image, label = volume(0, channels=3)
    write_nifti(tmp_path / "images" / "scan.nii.gz", image)
    write_nifti(tmp_path / "labels" / "scan.nii.gz", label)
    cases, info = find_cases("folder", tmp_path)
    assert [c.name for c in cases] == ["scan"] and info.num_channels == 3
    check_cases(cases, info)


# ---------------------------------------------------------------------------------------------------------
# Layouts that are refused, each naming the key or file


def test_missing_root_names_data_root(tmp_path):
    with pytest.raises(UserError, match=r"data\.root=.*nowhere"):
        find_cases("msd", tmp_path / "nowhere")


def test_unknown_layout_names_data_layout(tmp_path):
    with pytest.raises(UserError, match=r"data\.layout"):
        find_cases("bids", tmp_path)


def test_missing_dataset_json(tmp_path):
    with pytest.raises(UserError, match="dataset.json: not found"):
        find_cases("msd", tmp_path)


def test_invalid_json(make_dataset):
    root = make_dataset()
    (root / "dataset.json").write_text('{"labels": {"0": "background",')
    with pytest.raises(UserError, match=r"dataset\.json: invalid JSON .*line 1"):
        find_cases("msd", root)


@pytest.mark.parametrize("key", ["training", "labels"])
def test_msd_missing_key(make_dataset, key):
    root = make_dataset()
    meta = json.loads((root / "dataset.json").read_text())
    del meta[key]
    write_json(root / "dataset.json", meta)
    with pytest.raises(UserError, match=rf"dataset\.json: missing key '{key}'"):
        find_cases("msd", root)


@pytest.mark.parametrize("key", ["labels", "file_ending", "channel_names"])
def test_nnunet_missing_key(make_dataset, key):
    root = make_dataset("nnunet")
    meta = json.loads((root / "dataset.json").read_text())
    del meta[key]
    write_json(root / "dataset.json", meta)
    with pytest.raises(UserError, match=rf"dataset\.json: missing key '{key}'"):
        find_cases("nnunet", root)


def test_msd_training_entry_without_label(make_dataset):
    root = make_dataset()
    meta = json.loads((root / "dataset.json").read_text())
    del meta["training"][1]["label"]
    write_json(root / "dataset.json", meta)
    with pytest.raises(UserError, match=r"dataset\.json: 'training'\[1\] must have 'image' and 'label'"):
        find_cases("msd", root)


def test_labels_not_consecutive(make_dataset):
    root = make_dataset()
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = {"0": "background", "2": "liver"}
    write_json(root / "dataset.json", meta)
    with pytest.raises(UserError, match=r"dataset\.json: 'labels' must be the consecutive classes"):
        find_cases("msd", root)


def test_config_labels_disagreeing_with_dataset_json(make_dataset):
    root = make_dataset()
    assert find_cases("msd", root, labels=dict(SYNTH_LABELS))[1].labels == SYNTH_LABELS
    with pytest.raises(UserError, match=r"data\.labels=.*disagrees with .*dataset\.json"):
        find_cases("msd", root, labels={0: "background", 1: "tumour"})


def test_duplicate_case_names_msd(make_dataset):
    root = make_dataset()
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"].append(dict(meta["training"][0]))
    write_json(root / "dataset.json", meta)
    with pytest.raises(UserError, match="duplicate case name 'synth_000'"):
        find_cases("msd", root)


def test_duplicate_case_names_folder(make_dataset):
    root = make_dataset("folder")
    image, _ = volume(0)
    write_nifti(root / "images" / "synth_001.nii", image)
    with pytest.raises(UserError, match=r"duplicate case name 'synth_001' \(images/synth_001\.nii"):
        find_cases("folder", root)


def test_no_cases_msd(make_dataset):
    root = make_dataset()
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"] = []
    write_json(root / "dataset.json", meta)
    with pytest.raises(UserError, match=r"data\.root=.*: no training cases found in .*dataset\.json"):
        find_cases("msd", root)


@pytest.mark.parametrize(
    ("layout", "folders"), [("folder", ["images", "labels"]), ("nnunet", ["imagesTr", "labelsTr"])]
)
def test_no_cases_empty_folders(make_dataset, layout, folders):
    root = make_dataset(layout)
    for folder in folders:
        shutil.rmtree(root / folder)
        (root / folder).mkdir()
    with pytest.raises(UserError, match=rf"data\.root=.*: no training cases found in .*{folders[0]}"):
        find_cases(layout, root)


def test_missing_folder_names_it(make_dataset):
    root = make_dataset("folder")
    shutil.rmtree(root / "labels")
    with pytest.raises(UserError, match="missing folder labels/"):
        find_cases("folder", root)


def test_msd_missing_image_file(make_dataset):
    root = make_dataset()
    (root / "imagesTr" / "synth_001.nii.gz").unlink()
    with pytest.raises(UserError, match=r"imagesTr/synth_001\.nii\.gz: file not found"):
        find_cases("msd", root)


def test_msd_missing_label_file(make_dataset):
    root = make_dataset()
    (root / "labelsTr" / "synth_002.nii.gz").unlink()
    with pytest.raises(UserError, match=r"labelsTr/synth_002\.nii\.gz: file not found"):
        find_cases("msd", root)


def test_nnunet_missing_label_file(make_dataset):
    root = make_dataset("nnunet")
    (root / "labelsTr" / "synth_002.nii.gz").unlink()
    with pytest.raises(UserError, match=r"labelsTr/synth_002\.nii\.gz: label file not found"):
        find_cases("nnunet", root)


def test_nnunet_missing_channel_file(tmp_path):
    root = make_nnunet_two_channel(tmp_path)
    (root / "imagesTr" / "brain_b_0001.nii.gz").unlink()
    with pytest.raises(UserError, match=r"imagesTr/brain_b_0001\.nii\.gz: file not found \(channel 1"):
        find_cases("nnunet", root)


def test_nnunet_extra_channel_file(tmp_path):
    root = make_nnunet_two_channel(tmp_path)
    shutil.copy(root / "imagesTr" / "brain_a_0001.nii.gz", root / "imagesTr" / "brain_a_0002.nii.gz")
    with pytest.raises(
        UserError, match=r"imagesTr/brain_a_0002\.nii\.gz: channel 2 .*'channel_names' declares 2"
    ):
        find_cases("nnunet", root)


def test_nnunet_label_without_images(make_dataset):
    root = make_dataset("nnunet")
    shutil.copy(root / "labelsTr" / "synth_000.nii.gz", root / "labelsTr" / "extra.nii.gz")
    with pytest.raises(UserError, match=r"labelsTr/extra\.nii\.gz: label without images"):
        find_cases("nnunet", root)


def test_nnunet_num_training_mismatch(make_dataset):
    root = make_dataset("nnunet")
    meta = json.loads((root / "dataset.json").read_text())
    meta["numTraining"] = 5
    write_json(root / "dataset.json", meta)
    with pytest.raises(UserError, match=r"'numTraining' is 5 but .* hold 3 cases"):
        find_cases("nnunet", root)


def test_folder_image_without_label(make_dataset):
    root = make_dataset("folder")
    (root / "labels" / "synth_001.nii.gz").unlink()
    with pytest.raises(UserError, match=r"images/synth_001\.nii\.gz: no matching label file"):
        find_cases("folder", root)


def test_folder_label_without_image(make_dataset):
    root = make_dataset("folder")
    (root / "images" / "synth_002.nii.gz").unlink()
    with pytest.raises(UserError, match=r"labels/synth_002\.nii\.gz: no matching image file"):
        find_cases("folder", root)


# ---------------------------------------------------------------------------------------------------------
# Train/validation split


def fake_cases(n: int) -> list[Case]:
    return [
        Case(name=f"case_{i:02d}", images=(Path(f"i{i}.nii.gz"),), label=Path(f"l{i}.nii.gz"))
        for i in range(n)
    ]


def names(cases: list[Case]) -> list[str]:
    return [c.name for c in cases]


def test_split_is_deterministic_and_order_independent():
    cases = fake_cases(20)
    train, val = split_cases(cases, 0.2, seed=3)
    assert len(val) == 4 and len(train) == 16
    assert set(names(train)).isdisjoint(names(val)) and set(names(train + val)) == set(names(cases))
    shuffled = cases[:]
    random.Random(0).shuffle(shuffled)
    assert (names(train), names(val)) == tuple(map(names, split_cases(shuffled, 0.2, seed=3)))
    assert names(val) == sorted(names(val))


def test_split_depends_on_the_seed():
    cases = fake_cases(20)
    assert names(split_cases(cases, 0.25, seed=0)[1]) != names(split_cases(cases, 0.25, seed=1)[1])


def test_split_adding_a_case_moves_at_most_one_other():
    before = set(names(split_cases(fake_cases(20), 0.2, seed=0)[1]))
    after = set(names(split_cases(fake_cases(21), 0.2, seed=0)[1])) - {"case_20"}
    assert len(before ^ after) <= 1


def test_explicit_val_cases_override_the_fraction():
    train, val = split_cases(fake_cases(5), 0.9, seed=0, val_cases=["case_03", "case_01"])
    assert names(val) == ["case_01", "case_03"]
    assert names(train) == ["case_00", "case_02", "case_04"]


def test_unknown_val_case_names_the_key():
    with pytest.raises(UserError, match=r"data\.val_cases: unknown case names \['case_99'\]"):
        split_cases(fake_cases(5), 0.2, seed=0, val_cases=["case_01", "case_99"])


def test_val_cases_naming_every_case_leaves_no_training():
    with pytest.raises(UserError, match=r"data\.val_cases: .*no training cases"):
        split_cases(fake_cases(2), 0.2, seed=0, val_cases=["case_00", "case_01"])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_val_fraction_out_of_range(fraction):
    with pytest.raises(UserError, match=r"data\.val_fraction=.*between 0 and 1"):
        split_cases(fake_cases(5), fraction, seed=0)


def test_empty_validation_split_names_the_key():
    with pytest.raises(
        UserError, match=r"data\.val_fraction=0\.05 of 4 cases gives an empty validation split"
    ):
        split_cases(fake_cases(4), 0.05, seed=0)


def test_empty_training_split_names_the_key():
    with pytest.raises(UserError, match=r"data\.val_fraction=0\.95 of 4 cases gives an empty training split"):
        split_cases(fake_cases(4), 0.95, seed=0)


def test_two_classes_of_one_name_are_refused(make_dataset):
    """{1: c1, 2: c1} merged the two classes' scores in val_dice_per_class (one of them lost)."""
    root = make_dataset()
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = {"0": "background", "1": "tumour", "2": "tumour"}
    write_json(root / "dataset.json", meta)
    with pytest.raises(UserError, match=r"dataset\.json: 'labels' names classes 1 and 2 both 'tumour'; each"):
        find_cases("msd", root)


def test_nnunet_labels_give_background_0_and_each_value_once(make_dataset):
    root = make_dataset(layout="nnunet")
    meta = json.loads((root / "dataset.json").read_text())
    for labels, message in [
        ({"background": 1, "a": 0}, "'labels' gives background the value 1; nnU-Net's is 0"),
        ({"background": 0, "a": 1, "b": 1}, "'labels' gives the value 1 to 'a' and to 'b'"),
    ]:
        write_json(root / "dataset.json", {**meta, "labels": labels})
        with pytest.raises(UserError, match=message):
            find_cases("nnunet", root)


def test_a_missing_key_hints_at_the_other_layout_only(make_dataset):
    """An MSD dataset.json without 'labels', read as MSD, was told "an MSD dataset? use data.layout=msd"."""
    root = make_dataset()
    meta = json.loads((root / "dataset.json").read_text())
    del meta["labels"]
    write_json(root / "dataset.json", meta)
    with pytest.raises(UserError, match=r"dataset\.json: missing key 'labels'$"):
        find_cases("msd", root)
    with pytest.raises(
        UserError, match=r"missing key 'labels' \(it has a 'training' list: an MSD dataset\? use data"
    ):
        find_cases("nnunet", root)


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_folder_or_fifo_under_a_nifti_name_is_named_as_such(make_dataset, kind: str):
    """It was reported as "no matching image file in images/ (expected images/X.nii.gz)", which exists."""
    import os

    root = make_dataset("folder")
    image = root / "images" / f"{NAMES[0]}.nii.gz"
    image.unlink()
    image.mkdir() if kind == "folder" else os.mkfifo(image)
    what = "a folder" if kind == "folder" else r"a FIFO \(named pipe\)"
    with pytest.raises(UserError, match=rf"^images/{NAMES[0]}\.nii\.gz: {what}, not a NIfTI file$"):
        find_cases("folder", root)


def test_nnunet_file_ending_other_than_the_files_is_named(make_dataset):
    """ "file_ending": ".nii" over .nii.gz files said only "no training cases found in imagesTr"."""
    root = make_dataset("nnunet")
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "file_ending": ".nii"}))
    with pytest.raises(UserError) as err:
        find_cases("nnunet", root)
    assert str(err.value) == (
        f"{root / 'dataset.json'}: 'file_ending' is '.nii', but the images in imagesTr/ end in .nii.gz"
    )
