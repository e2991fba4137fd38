"""The run record's one typed builder: its JSON form, its coordinates, and the reference page written from it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from norm_experiments import run_record
from norm_experiments.run_record import RunRecord, Status

PAGE = Path(__file__).parents[1] / "docs" / "reference" / "run_folder.md"


def test_the_reference_page_is_written_from_the_record() -> None:
    page = PAGE.read_text(encoding="utf-8")
    assert run_record.with_field_table(page) == page, (
        "docs/reference/run_folder.md is stale: python -m norm_experiments.run_record docs/reference/run_folder.md"
    )
    for name in run_record.FIELDS:
        assert f"| `{name}` |" in page


def test_the_page_generator_rewrites_only_the_table(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(f"intro\n{run_record.TABLE_START}\nold rows\n{run_record.TABLE_END}\noutro\n")
    subprocess.run([sys.executable, "-m", "norm_experiments.run_record", str(page)], check=True)
    text = page.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old rows" not in text
    assert "| `val_dice` | number or null | final validation Dice" in text
    assert "| `status` | string |" in text and "| `per_case` | object or null |" in text


def test_coordinates_are_the_fields_every_record_has() -> None:
    assert run_record.COORDINATES == ("status", "norm", "batch_size", "seed")
    with pytest.raises(TypeError):
        RunRecord(status=Status.FAILED, norm="batch", batch_size=1)  # type: ignore[call-arg]  # no seed


def test_json_form_and_unknown_fields(tmp_path: Path) -> None:
    record = RunRecord(status=Status.COMPLETED, norm="group", batch_size=2, seed=1, val_dice=0.8)
    full = record.to_json()
    # eval_modes exist only for the BatchNorm family: absent while unset, every other field written
    assert set(full) == run_record.FIELDS - {"eval_modes", "eval_modes_hd95", "group_layers"}
    assert full["status"] == "completed" and full["lr"] is None
    assert record.__class__(**{**full, "eval_modes": {"running": 0.5}}).to_json()["eval_modes"] == {
        "running": 0.5
    }
    short = record.to_json(keep_none=False)
    assert short == {"status": "completed", "norm": "group", "batch_size": 2, "seed": 1, "val_dice": 0.8}
    run_record.write(tmp_path, record)
    assert json.loads((tmp_path / "metrics.json").read_text()) == full
    with pytest.raises(TypeError):  # a field the record does not know is a bug, not a new column
        RunRecord(status=Status.COMPLETED, norm="group", batch_size=2, seed=1, val_dcie=0.8)  # type: ignore[call-arg]


def record_keys_read(path: Path) -> set[str]:
    """String keys a module reads from a record: `<x>.data.get("k")`, `<x>.data["k"]`, `<x>.value("k")`."""
    import ast

    keys = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            target, first = node.func, node.args[0]
            on_data = (
                target.attr == "get"
                and isinstance(target.value, ast.Attribute)
                and target.value.attr == "data"
            )
            if (
                (on_data or target.attr == "value")
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
            ):
                keys.add(first.value)
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "data"
        ):
            if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
                keys.add(node.slice.value)
    return keys


def test_the_report_reads_only_fields_the_record_has() -> None:
    """The report's reader spells record fields as strings: each must be a RunRecord field (a renamed field
    fails here, not silently as an empty column)."""
    from norm_experiments.report.collect import CONDITION_FIELDS

    package = Path(__file__).parents[1] / "norm_experiments"
    read = set().union(
        *(record_keys_read(p) for p in [*package.glob("report/*.py"), *package.glob("sweep/*.py")])
    )
    assert {"status", "per_case", "eval_modes", "wall_time_s"} <= read  # the walk finds what it should
    assert read <= run_record.FIELDS, read - run_record.FIELDS
    assert set(CONDITION_FIELDS) <= run_record.FIELDS
