"""norm-exp-check on hostile inputs: a net= config that would run code, weights that are NaN, a FIFO or
/dev/zero, and a dataset whose validation case is a training case under another name."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import nibabel as nib
import pytest
import torch
import yaml
from monai.networks.nets import UNet

from norm_experiments.data.checks import duplicate_images
from norm_experiments.data.pipeline import load_data
from norm_experiments.data.synthetic import SynthConfig, generate_dataset
from tests.helpers import assert_clean_failure, compose_config
from tests.test_check import UNET, check_error, data_args, run_check

# Subprocess runs of the real CLI or trainings: the full suite runs them, `pytest -m "not slow"` does not.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = SynthConfig(num_cases=6, shape=(24, 24, 24), radius_range=(3.0, 6.0), seed=5)
    return generate_dataset(tmp_path_factory.mktemp("hostile-check") / "msd", cfg, "msd")


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    net = UNet(**{k: v for k, v in UNET.items() if k != "_target_"})
    torch.save(net.state_dict(), tmp_path / "w.pt")
    return tmp_path / "w.pt"


def _net_file(tmp_path: Path, net: dict) -> str:
    (tmp_path / "net.yaml").write_text(yaml.safe_dump(net))
    return "net=net.yaml"


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    return victim


@pytest.mark.parametrize(
    ("net", "named"),
    [
        ({"_target_": "builtins.open", "file": "{victim}", "mode": "w"}, "net._target_=builtins.open"),
        (  # nested inside a real network's arguments
            {**UNET, "act": {"_target_": "builtins.open", "file": "{victim}", "mode": "w"}},
            "net.act._target_=builtins.open",
        ),
        (  # a function reachable through an allowed module's attributes
            {"_target_": "monai.networks.nets.unet.torch.save", "obj": 1, "f": "{victim}"},
            "net._target_=monai.networks.nets.unet.torch.save",
        ),
        ({**UNET, "act": "${{oc.env:HOME}}"}, "net.act=${oc.env:HOME}"),
    ],
)
def test_net_config_runs_nothing_outside_the_allow_list(
    net: dict, named: str, dataset: Path, weights: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    victim = _victim(tmp_path)
    net = yaml.safe_load(
        yaml.safe_dump(net).replace("{victim}", str(victim)).replace("{{", "{").replace("}}", "}")
    )
    line = check_error(
        [f"weights={weights}", _net_file(tmp_path, net), *data_args(dataset)], tmp_path, monkeypatch, capsys
    )
    assert named in line, line
    assert victim.read_text() == "precious"


def test_nan_weights_are_refused(dataset: Path, weights: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """An allowed MONAI UNet whose weights hold NaN: refused before any score is computed."""
    nan = torch.load(weights)
    key = next(k for k, v in nan.items() if v.is_floating_point())
    nan[key] = torch.full_like(nan[key], float("nan"))
    torch.save(nan, tmp_path / "nan.pt")
    line = check_error(
        ["weights=nan.pt", _net_file(tmp_path, UNET), *data_args(dataset)], tmp_path, monkeypatch, capsys
    )
    assert f"nan.pt: {key} holds {nan[key].numel()} NaN or infinite value(s)" in line, line


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "folder"])
def test_weights_that_are_not_a_regular_file_are_refused_without_hanging(
    kind: str, dataset: Path, tmp_path: Path
) -> None:
    path = tmp_path / "w.pt"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    result = run_check(["weights=w.pt", *data_args(dataset)], tmp_path)  # a hang fails by its timeout
    output = result.stdout + result.stderr
    assert_clean_failure(result)
    expected = {"fifo": "a FIFO (named pipe)", "dev-zero": "a character device", "folder": "a folder"}[kind]
    assert f"w.pt: refused, {expected} where a file is expected" in result.stderr, output


def _duplicate(root: Path, source: str, copy: str) -> None:
    for folder in ("imagesTr", "labelsTr"):
        (root / folder / f"{copy}.nii.gz").write_bytes((root / folder / f"{source}.nii.gz").read_bytes())


def test_a_case_in_both_splits_is_reported_as_leakage(
    dataset: Path, weights: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "leaky"
    root.mkdir()
    for item in dataset.iterdir():
        (root / item.name).symlink_to(item) if item.is_file() else None
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir()
        for f in (dataset / folder).iterdir():
            (root / folder / f.name).write_bytes(f.read_bytes())
    _duplicate(root, "synth_001", "synth_005")  # synth_005: a validation case below
    # Another name's header, the same voxels: the copy is the same scan renamed.
    img = nib.load(str(root / "imagesTr" / "synth_005.nii.gz"))
    img.header["descrip"] = b"renamed copy"
    nib.save(img, str(root / "imagesTr" / "synth_005.nii.gz"))
    args = [f"data.root={root}", "data.layout=msd", "data.val_cases=[synth_004,synth_005]"]
    cfg = compose_config(["experiment=smoke", "data=msd", *args])
    with caplog.at_level(logging.WARNING):
        data = load_data(cfg.data)
    assert duplicate_images(data.train, data.val) == [("synth_005", "synth_001")]
    assert "validation case synth_005 holds the same voxels as training case synth_001" in caplog.text
    clean = load_data(
        compose_config(["experiment=smoke", "data=msd", f"data.root={dataset}", *args[1:]]).data
    )
    assert duplicate_images(clean.train, clean.val) == []
    result = run_check([f"weights={weights}", "net=net.yaml", *data_args(root), args[2]], _write(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        "LEAKAGE: validation case synth_005 holds the same voxels as training case synth_001" in result.stdout
    )


def _write(tmp_path: Path) -> Path:
    (tmp_path / "net.yaml").write_text(yaml.safe_dump(UNET))
    return tmp_path
