"""The dataset layout registry (data/registry.py): one row per layout. Adding a layout is one plug-in module in
norm_experiments/data/plugins/, one file configs/data/NAME.yaml and one row in EXPECTED below
(test_every_registered_layout_has_a_row fails until the row exists)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from norm_experiments.config import CONFIG_DIR
from norm_experiments.data import generated, registry
from norm_experiments.data.layouts import find_cases
from norm_experiments.errors import UserError

ROOT = Path(__file__).parents[2]

# One row per layout: (generated on first use, can be written by norm-exp-synth, (image, label) of case "x").
EXPECTED = {
    "brain": (True, False, None),
    "folder": (False, True, ("images/x.nii.gz", "labels/x.nii.gz")),
    "msd": (False, True, ("imagesTr/x.nii.gz", "labelsTr/x.nii.gz")),
    "nnunet": (False, True, ("imagesTr/x_0000.nii.gz", "labelsTr/x.nii.gz")),
    "synthetic": (True, False, None),
}


def test_every_registered_layout_has_a_row() -> None:
    assert set(registry.names()) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_layout_is_what_its_row_says(name: str) -> None:
    record = registry.get(name)
    is_generated, writable, files = EXPECTED[name]
    assert (record.generated, record.writable, bool(record.find)) == (
        is_generated,
        writable,
        not is_generated,
    )
    assert (generated.case_paths(name, "x") if writable else None) == files
    assert record.summary


def test_every_layout_has_its_config_file_and_every_data_file_names_a_layout() -> None:
    for name, path in registry.REGISTRY.config_files().items():
        assert OmegaConf.load(path).layout == name, path
    for path in (CONFIG_DIR / "data").glob("*.yaml"):  # presets (msd_spleen, ...) name a layout too
        layout = OmegaConf.load(path).get("layout")
        assert layout is None or layout in registry.names(), path


def test_the_lists_of_layouts_are_the_registry_s() -> None:
    assert generated.LAYOUTS == registry.writable() == ("folder", "msd", "nnunet")
    assert registry.generated() == ("brain", "synthetic")
    with pytest.raises(UserError, match=r"data.layout='synthetic' is not one of folder, msd, nnunet$"):
        find_cases("synthetic", Path("."))


def test_the_readme_lists_every_layout() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (row,) = [line for line in readme.splitlines() if line.startswith("| `data` |")]
    listed = {part.split("`")[1] for part in row.split("|")[2].split(",")}
    assert set(registry.names()) <= listed
