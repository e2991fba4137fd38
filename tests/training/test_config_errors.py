"""Mistakes in a command or a dataset stop before training: one line naming the key or file, exit != 0,
no traceback, and nothing left behind that could pass for a result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from norm_experiments import config_schema
from norm_experiments.config import CONFIG_DIR
from norm_experiments.errors import UserError
from norm_experiments.training.build import make_plan
from tests.helpers import assert_clean_failure, compose_config, no_result_left, run_cli


def test_unknown_norm_lists_the_valid_ones(tmp_path: Path) -> None:
    result = run_cli(["norm=batchnrom"], cwd=tmp_path)
    assert_clean_failure(result, "norm/batchnrom", "group", code=1)  # Hydra's own message and exit status
    assert no_result_left(tmp_path)


def test_unknown_key_is_refused(tmp_path: Path) -> None:
    result = run_cli(["data.batch_sze=2"], cwd=tmp_path)
    assert_clean_failure(result, "batch_sze", code=1)


# Checked in process (the same code the CLI runs: make_plan), quick; the CLI test below shows the exit path.
@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["data.batch_size=0"], "data.batch_size: must be a whole number >= 1, got 0"),
        (["data.patch_size=[18,18,18]"], "divisible by 4"),
        (["data=msd", "data.root=/nonexistent/dataset"], "data.root: dataset folder does not exist"),
        (["data=msd"], "data.root: required"),
        (["trainer.device=tpu"], "trainer.device: must be one of auto, cpu, cuda"),
        (["data.cache_on_device=gpu"], "data.cache_on_device: must be true or false"),
        (["trainer.channels_last=yes_please"], "trainer.channels_last"),
        (["trainer.cpu_conv=fast"], "trainer.cpu_conv"),
        (["norm=group", "norm.options.num_groups=3"], "norm.options.num_groups"),
        (["data.patch_size=16"], "data.patch_size: must be a list of 3 whole numbers >= 1, got 16"),
        (["data.patch_size=null"], "data.patch_size: must be a list of 3"),
        (["optim.lr=abc"], "optim.lr: must be a number > 0, got 'abc'"),
        (["data.val_fraction=abc"], "data.val_fraction: must be a number in (0, 1)"),
        (["seed=abc"], "seed: must be a whole number, got 'abc'"),
        (["trainer.sw_overlap=abc"], "trainer.sw_overlap: must be a number in [0, 1)"),
        (["model.depth=-1"], "model.depth: must be a whole number >= 1, got -1"),
        (
            ["+trainer.sampels=10"],
            "trainer.sampels: not a key this project reads; did you mean trainer.samples?",
        ),
        (["+norm.name2=x"], "norm.name2: not a key this project reads"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], needle: str) -> None:
    with pytest.raises(UserError) as err:
        make_plan(compose_config(["experiment=smoke", *overrides]))
    assert needle in str(err.value)


def test_every_key_of_every_config_option_has_a_check() -> None:
    """The schema covers every key the configs define: a key it lacks would be refused as unknown."""
    for group in ("data", "model", "norm", "optim", "trainer", "experiment"):
        for option in sorted((CONFIG_DIR / group).glob("*.yaml")):
            overrides = [f"{group}={option.stem}"]
            if group == "data" and option.stem != "synthetic":
                overrides.append(f"data.root={CONFIG_DIR}")
            config_schema.validate(compose_config(overrides))


def test_a_bad_value_through_the_cli_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = run_cli(["experiment=smoke", "data.patch_size=16"], cwd=tmp_path)
    assert_clean_failure(result, "error: data.patch_size: must be a list of 3 whole numbers")
    assert len(result.stderr.strip().splitlines()) == 1
    assert no_result_left(tmp_path)


def test_dataset_without_cases(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "name": "empty",
                "labels": {"0": "background", "1": "x"},
                "modality": {"0": "MRI"},
                "training": [],
            }
        )
    )
    result = run_cli(["experiment=smoke", "data=msd", f"data.root={root}"], cwd=tmp_path)
    assert_clean_failure(result, "error:", "no training cases")
    assert no_result_left(tmp_path)
