"""The networks norm-exp-check accepts as users have them: a MONAI bundle folder (its network_def, its
models/model.pt), MONAI's DynUNet from a YAML file. In process, on real NIfTI files; a bundle's expressions are
refused, never evaluated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from monai.networks.nets import DynUNet, UNet
from omegaconf import OmegaConf

from norm_experiments.check import check
from norm_experiments.config import CONFIG_DIR
from norm_experiments.data.synthetic import SynthConfig, generate_dataset
from norm_experiments.diagnose.network import bundle_network
from norm_experiments.errors import UserError

NETWORK_DEF = {
    "_target_": "UNet",  # a bundle's short name
    "spatial_dims": "@spatial_dims",
    "in_channels": 1,
    "out_channels": 3,
    "channels": [8, 16, 32],
    "strides": [2, 2],
    "num_res_units": 0,
    "norm": "batch",
}


def write_bundle(folder: Path, network_def: dict, **top: object) -> Path:
    """A bundle as monai.bundle lays it out: configs/inference.json and models/model.pt."""
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    config = {"spatial_dims": 3, "device": "$torch.device('cpu')", "network_def": network_def}
    config["network"] = "$@network_def.to(@device)"
    (folder / "configs" / "inference.json").write_text(json.dumps(config | top))
    return folder


def test_bundle_network_def_becomes_a_network_config(tmp_path: Path) -> None:
    net = bundle_network(write_bundle(tmp_path / "b", NETWORK_DEF))
    assert net._target_ == "monai.networks.nets.UNet" and net.spatial_dims == 3  # "@spatial_dims" filled in
    assert net.channels == [8, 16, 32]


def test_bundle_ids_with_paths_and_monai_special_keys(tmp_path: Path) -> None:
    """monai.bundle ids name nested values ("a::b::0"; "#" in older bundles); _requires_ and _desc_ say
    nothing about the network's arguments and are left out."""
    change = {
        "channels": "@sizes::widths",
        "strides": "@sizes#strides",
        "in_channels": "@sizes::inputs::0",
        "_requires_": "@device",  # an expression: never evaluated, never passed on
        "_desc_": "the segmentation network",
    }
    sizes = {"widths": [8, 16, 32], "strides": [2, 2], "inputs": [1, 4]}
    net = bundle_network(write_bundle(tmp_path / "b", NETWORK_DEF | change, sizes=sizes))
    assert net.channels == [8, 16, 32] and net.strides == [2, 2] and net.in_channels == 1
    assert "_requires_" not in net and "_desc_" not in net
    for bad, needle in (
        ({"in_channels": "@sizes::inputs::7"}, "refers to no plain value"),
        ({"in_channels": "@sizes::nothing"}, "refers to no plain value"),
        ({"in_channels": "@sizes::inputs::²"}, "refers to no plain value"),  # a digit int() refuses
        ({"_disabled_": True}, r"network_def\._disabled_=True: changes what the bundle builds"),
        ({"_mode_": "callable"}, r"network_def\._mode_=callable: changes what the bundle builds"),
    ):
        folder = write_bundle(
            tmp_path / f"bad{len(list(tmp_path.iterdir()))}", NETWORK_DEF | bad, sizes=sizes
        )
        with pytest.raises(UserError, match=needle):
            bundle_network(folder)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"in_channels": "$__import__('os').system('touch pwned')"}, "an expression or macro"),
        ({"channels": "%configs/other.json#channels"}, "an expression or macro"),
        ({"in_channels": "@device"}, "refers to no plain value"),  # an expression behind a reference
        ({"in_channels": "@no_such_key"}, "refers to no plain value"),
    ],
)
def test_bundle_expressions_are_refused_not_run(tmp_path: Path, change: dict, needle: str) -> None:
    folder = write_bundle(tmp_path / "b", NETWORK_DEF | change)
    with pytest.raises(UserError, match=needle) as err:
        bundle_network(folder)
    assert "network_def" in str(err.value)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_a_folder_that_is_no_bundle(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="a folder, but not a MONAI bundle"):
        bundle_network(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "inference.json").write_text(json.dumps({"network": "x"}))
    with pytest.raises(UserError, match="no network_def with a _target_"):
        bundle_network(tmp_path)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = SynthConfig(num_cases=6, shape=(24, 24, 24), radius_range=(3.0, 6.0))
    return generate_dataset(tmp_path_factory.mktemp("check-nets") / "data", cfg, "msd")


def run_check(overrides: list[str], cwd: Path, monkeypatch, capsys) -> str:
    monkeypatch.chdir(cwd)
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("check", overrides=overrides)
    check(cfg)
    return capsys.readouterr().out


def data_args(root: Path) -> list[str]:
    return [
        "data=msd",
        f"data.root={root}",
        "data.patch_size=[16,16,16]",
        "data.val_fraction=0.5",
        "trainer.precise_bn_samples=8",
        "trainer.num_threads=1",
    ]


def test_check_a_bundle_as_users_have_it(small_data: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    folder = write_bundle(tmp_path / "spleen_bundle", NETWORK_DEF)
    torch.manual_seed(0)
    net = UNet(**{k: v for k, v in NETWORK_DEF.items() if k != "_target_"} | {"spatial_dims": 3})
    torch.save(net.state_dict(), folder / "models" / "model.pt")  # what a bundle's model.pt holds
    out = run_check(
        ["net=spleen_bundle", "weights=spleen_bundle/models/model.pt", *data_args(small_data)],
        tmp_path,
        monkeypatch,
        capsys,
    )
    assert "(network: monai.networks.nets.UNet)" in out
    assert (
        "2. Each validation case's Dice" in out and "3. Gaps over the running statistics, on 3 cases" in out
    )
    assert "Verdict:" in out


def test_check_a_monai_dynunet_state_dict(small_data: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    spec = {
        "_target_": "monai.networks.nets.DynUNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 3,
        "kernel_size": [3, 3, 3],
        "strides": [1, 2, 2],
        "upsample_kernel_size": [2, 2],
        "norm_name": "batch",
    }
    OmegaConf.save(OmegaConf.create(spec), tmp_path / "dynunet.yaml")
    torch.manual_seed(0)
    net = DynUNet(**{k: v for k, v in spec.items() if k != "_target_"})
    torch.save(net.state_dict(), tmp_path / "dynunet.pt")
    out = run_check(
        ["net=dynunet.yaml", "weights=dynunet.pt", *data_args(small_data)], tmp_path, monkeypatch, capsys
    )
    assert "(network: monai.networks.nets.DynUNet)" in out
    assert "3. Gaps over the running statistics, on 3 cases" in out and "Verdict:" in out


def test_help_shows_the_commands_own_keys_first(tmp_path: Path) -> None:
    from tests.helpers import run_cli

    result = run_cli(["--help"], tmp_path, module="norm_experiments.check", timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("norm-exp-check: is my trained BatchNorm model fine in eval mode?")
    keys = lines[lines.index("Its own keys:") + 1 :]
    keys = keys[: next(i for i, k in enumerate(keys) if not k.startswith("  "))]  # the indented block
    named = [k.split()[0].split("=")[0] for k in keys if not k.startswith("    ")]  # not continuation lines
    assert named == [
        "weights",
        "net",
        "margin",
        "write_repaired",
        "save_predictions",
        "trust_weights",
    ]
    assert len(lines) < 50 and "Exit status: 0 done" in result.stdout


def test_a_bundle_config_that_is_a_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    import os

    (tmp_path / "configs").mkdir()
    os.mkfifo(tmp_path / "configs" / "inference.json")
    with pytest.raises(UserError, match="inference.json: refused, a FIFO"):
        bundle_network(tmp_path)


def test_a_reference_cannot_smuggle_a_target_in(tmp_path: Path) -> None:
    """`@key` fills in a value of the bundle config; a _target_ inside it is checked like any other."""
    from norm_experiments.diagnose.network import net_config

    evil = {"_target_": "builtins.open", "file": str(tmp_path / "pwned"), "mode": "w"}
    folder = write_bundle(tmp_path / "b", NETWORK_DEF | {"act": "@evil"}, evil=evil)
    with pytest.raises(UserError, match="net.act._target_=builtins.open: not allowed"):
        net_config(str(folder))
    assert not (tmp_path / "pwned").exists()


def test_check_writes_label_maps_on_each_cases_own_grid(
    small_data: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    import nibabel as nib
    import numpy as np

    folder = write_bundle(tmp_path / "bundle", NETWORK_DEF)
    torch.manual_seed(0)
    net = UNet(**{k: v for k, v in NETWORK_DEF.items() if k != "_target_"} | {"spatial_dims": 3})
    torch.save(net.state_dict(), folder / "models" / "model.pt")
    args = ["net=bundle", "weights=bundle/models/model.pt", "save_predictions=preds", *data_args(small_data)]
    out = run_check(args, tmp_path, monkeypatch, capsys)
    assert "Label maps and error maps per case and mode: preds" in out
    index = json.loads((tmp_path / "preds" / "cases.json").read_text())
    assert len(index) == 3  # the validation cases
    for case, entry in index.items():
        source = nib.load(entry["image"][0])
        for mode in ("running", "batch", "precise"):
            for name in (f"{mode}.nii.gz", f"{mode}_errors.nii.gz"):
                image = nib.load(tmp_path / "preds" / case / name)
                assert image.shape == source.shape[:3] and np.allclose(image.affine, source.affine)
                assert set(np.unique(np.asarray(image.dataobj))) <= {0, 1, 2, 3}
            assert set(entry["dice"][mode]) == {"class1", "class2"}
    # An existing, non-empty folder is never written into.
    with pytest.raises(SystemExit):
        run_check(args, tmp_path, monkeypatch, capsys)
    assert "save_predictions=preds: exists and is not an empty folder" in capsys.readouterr().err
