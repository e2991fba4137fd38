"""Sweep run folder names: swept keys first (the sweeper's params, then the command line's sweeps), shared
keys after them, execution-only keys left out, lists readable, and an existing folder of the old naming
kept so that the same command still finds its runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from norm_experiments.run_names import (
    SWEPT_KEYS_ENV,
    flat_run_name,
    readable,
    safe,
    sweep_run_name,
    sweep_subdir,
    swept_keys,
)


def test_swept_keys_from_params_then_command_line() -> None:
    params = {"norm": "batch,group", "data.batch_size": "1,2"}
    task = ["experiment=smoke", "seed=0,1", "data.patch_size=[4,4,4]", "norm=batch,group"]
    assert swept_keys(task, params) == ["norm", "data.batch_size", "seed"]
    assert swept_keys(["seed=range(3)", "lr=1"], None) == ["seed"]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ([16, 16, 32], "16x16x32"),
        (["case_1", "case_2"], "case_1+case_2"),
        ([1.5, 2], "1.5x2"),
        ("raw", "raw"),
    ],
)
def test_readable_values(value, text: str) -> None:
    assert readable(value) == text


def test_swept_keys_come_first_and_execution_keys_are_left_out() -> None:
    task = [
        "data.root=/data/Task04",
        "data.val_cases=[a,b]",
        "data.patch_size=[16,16,16]",
        "seed=2",
        "norm=group",
        "data.batch_size=4",
        "trainer.device=cpu",
    ]
    swept = ["norm", "data.batch_size", "seed"]
    name = flat_run_name(task, swept, exclude_keys=["trainer.device"])
    assert name == (
        "norm=group,data.batch_size=4,seed=2,data.patch_size=16x16x16,data.root=_data_Task04,data.val_cases=a+b"
    )
    assert sweep_run_name([], []) == "default"
    # today's naming: grouped by the first swept key, what every run shares left out
    assert (
        sweep_run_name(task, swept, exclude_keys=["trainer.device"]) == "norm=group/data.batch_size=4,seed=2"
    )
    assert sweep_run_name(task, ["norm"]) == "norm=group"
    assert sweep_run_name(task, ["data.val_cases"]) == "data.val_cases=a+b"
    # no swept key known (a launcher that lost the environment): every override, never one shared name
    assert sweep_run_name(task, []) == flat_run_name(task, [])


def test_long_names_are_cut_with_a_hash() -> None:
    a, b = safe("norm=batch," + "x" * 200), safe("norm=batch," + "x" * 199 + "y")
    assert len(a) == 120 and a.startswith("norm=batch,") and a != b


def test_subdir_keeps_an_existing_folder_of_the_old_naming(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(SWEPT_KEYS_ENV, "norm")
    task = ["experiment=smoke", "norm=group"]
    assert sweep_subdir(str(tmp_path), "experiment=smoke,norm=group", task, None) == "norm=group"
    (tmp_path / "norm=group,experiment=smoke").mkdir()  # a sweep started before the grouped names
    assert (
        sweep_subdir(str(tmp_path), "experiment=smoke,norm=group", task, None)
        == "norm=group,experiment=smoke"
    )
    (tmp_path / "experiment=smoke,norm=group").mkdir()  # a sweep started before the swept-first names
    assert (
        sweep_subdir(str(tmp_path), "experiment=smoke,norm=group", task, None)
        == "experiment=smoke,norm=group"
    )
