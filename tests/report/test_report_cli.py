"""The console script, run as a subprocess the way a user runs it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests import helpers
from tests.helpers import assert_clean_failure


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The command as a user runs it (tests/helpers.py's run_cli), from the current folder."""
    return helpers.run_cli(list(args), Path.cwd(), timeout=60, module="norm_experiments.report.cli")


def test_cli_prints_table_and_writes_files(small_sweep, tmp_path):
    out = tmp_path / "out"
    result = run_cli(str(small_sweep), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "| norm | bs 1 | bs 2 |" in result.stdout
    assert "| batch | 0.500 ± 0.100 | 0.700 ± 0.100 |" in result.stdout
    for name in ("report.md", "results.csv", "runs.csv", "dice_vs_batch_size.png", "bn_eval_gap.png"):
        assert (out / name).exists(), name


def test_cli_warns_about_corrupt_file(small_sweep):
    bad = small_sweep / "x" / "metrics.json"
    bad.parent.mkdir()
    bad.write_text("{")
    result = run_cli(str(small_sweep))
    assert result.returncode == 0, result.stderr
    assert f"warning: unreadable metrics.json: {bad}" in result.stderr


def test_cli_empty_dir_is_one_error_line(tmp_path):
    result = run_cli(str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: no metrics.json found under {tmp_path}"]
    assert "Traceback" not in result.stderr


def test_cli_only_corrupt_files_is_an_error_not_an_empty_report(tmp_path):
    """Issue #15: a folder whose only metrics.json is corrupt used to exit 0 with an empty report."""
    bad = tmp_path / "run" / "metrics.json"
    bad.parent.mkdir()
    bad.write_text('{"status": "completed", "norm"')
    missing_field = tmp_path / "other" / "metrics.json"
    missing_field.parent.mkdir()
    missing_field.write_text('{"status": "completed"}')
    result = run_cli(str(tmp_path))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: no readable metrics.json: ")
    assert f"{bad} (invalid JSON" in line and f"{missing_field} (missing field 'norm')" in line
    assert list(tmp_path.glob("report.md")) == [] and list(tmp_path.glob("*.csv")) == []


def test_cli_out_where_no_folder_can_be_made(small_sweep, tmp_path):
    (tmp_path / "a_file").write_text("keep me")
    for args in (["--out", str(tmp_path / "a_file")], ["--doc", str(tmp_path / "a_file" / "results.md")]):
        result = run_cli(str(small_sweep), *args)
        assert_clean_failure(result)
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"error: cannot write the report: {tmp_path / 'a_file'}")
    assert (tmp_path / "a_file").read_text() == "keep me"
