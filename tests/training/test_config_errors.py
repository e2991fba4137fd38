"""Mistakes in a command or a dataset stop before training: one line naming the key or file, exit != 0,
no traceback, and nothing left behind that could pass for a result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import run_cli


def assert_clean_failure(result, *needles: str, code: int = 2) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == code, output[-2000:]
    assert "Traceback" not in output, output[-2000:]
    for needle in needles:
        assert needle in output, output[-2000:]


def no_result_left(cwd: Path) -> bool:
    """No metrics.json claiming anything but a failure, no weights."""
    for path in cwd.rglob("metrics.json"):
        if json.loads(path.read_text())["status"] != "failed":
            return False
    return not list(cwd.rglob("model.pt")) and not list(cwd.rglob("checkpoint.pt"))


def test_unknown_norm_lists_the_valid_ones(tmp_path: Path) -> None:
    result = run_cli(["norm=batchnrom"], cwd=tmp_path)
    assert_clean_failure(result, "norm/batchnrom", "group", code=1)  # Hydra's own message and exit status
    assert no_result_left(tmp_path)


def test_unknown_key_is_refused(tmp_path: Path) -> None:
    result = run_cli(["data.batch_sze=2"], cwd=tmp_path)
    assert_clean_failure(result, "batch_sze", code=1)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["data.batch_size=0"], "data.batch_size"),
        (["data.patch_size=[64,64,64]", "data.pad_to_patch=false"], "data.patch_size"),
        (["data.patch_size=[18,18,18]"], "divisible by 4"),
        (["data=msd", "data.root=/nonexistent/dataset"], "data.root"),
        (["trainer.device=tpu"], "trainer.device"),
        (["data.cache_on_device=gpu"], "data.cache_on_device"),
        (["trainer.channels_last=yes_please"], "trainer.channels_last"),
        (["trainer.cpu_conv=fast"], "trainer.cpu_conv"),
        (["norm=group", "norm.options.num_groups=3"], "norm.options.num_groups"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, overrides: list[str], needle: str) -> None:
    result = run_cli(["experiment=smoke", *overrides], cwd=tmp_path)
    assert_clean_failure(result, "error:", needle)
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
