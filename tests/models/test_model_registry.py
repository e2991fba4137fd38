"""The model registry (models/registry.py): one row per model. Adding a model is one plug-in module in
norm_experiments/models/plugins/, one file configs/model/NAME.yaml and one row in EXPECTED below
(test_every_registered_model_has_a_row fails until the row exists)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from norm_experiments.config import CONFIG_DIR
from norm_experiments.errors import UserError
from norm_experiments.models import entry, model_levels, registry
from tests.helpers import compose_config

ROOT = Path(__file__).parents[2]

# One row per model: for a 64³ patch of 1 mm voxels with its default config, (downsamplings, channels at the
# bottleneck).
EXPECTED = {
    "basic_unet": (4, 64),
    "dynunet": (4, 320),
    "unet": (3, 64),
}


def test_every_registered_model_has_a_row() -> None:
    assert set(registry.names()) == set(EXPECTED)


def test_every_registered_model_has_a_config_file_and_no_file_is_unregistered() -> None:
    files = {p.stem for p in (CONFIG_DIR / "model").glob("*.yaml")}
    assert files == set(registry.names())
    for name, path in registry.REGISTRY.config_files().items():
        assert OmegaConf.load(path).name == name, path


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_model_plans_its_levels(name: str) -> None:
    cfg = compose_config([f"model={name}", "data.patch_size=[64,64,64]"])
    levels = model_levels(cfg.model, [64, 64, 64], [1.0, 1.0, 1.0])
    assert (len(levels) - 1, levels[-1].channels) == EXPECTED[name]
    assert registry.get(name).summary


def test_an_unknown_model_names_the_key_the_valid_names_and_the_closest() -> None:
    with pytest.raises(
        UserError, match=r"model.name: unknown model 'unte' \(did you mean 'unet'\?\); valid: "
    ):
        entry("unte")


def test_the_readme_lists_every_model() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (row,) = [line for line in readme.splitlines() if line.startswith("| `model` |")]
    listed = {part.split("`")[1] for part in row.split("|")[2].split(",")}
    assert listed == set(registry.names())
