"""Files in a sweep folder are untrusted: the report neither resolves the environment into a document nor
hangs on a FIFO where a metrics.json belongs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from norm_experiments.report.collect import read_run
from norm_experiments.report.provenance import sweep_command
from tests.helpers import assert_clean_failure


def test_an_environment_interpolation_in_multirun_yaml_is_not_resolved(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("NORM_EXP_SECRET", "hunter2")
    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task:\n    - norm=batch\n    - name=${oc.env:NORM_EXP_SECRET}\n"
    )
    command = sweep_command(tmp_path)
    assert command is not None and "hunter2" not in command and "oc.env" in command


def test_a_fifo_as_metrics_json_is_refused_without_waiting(tmp_path: Path) -> None:
    fifo = tmp_path / "metrics.json"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="cannot read"):
        read_run(fifo)  # would block forever on an unbounded open


def test_report_to_a_full_standard_output_is_one_line(small_sweep, tmp_path: Path) -> None:
    import subprocess
    import sys

    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "norm_experiments.report.cli",
                str(tmp_path),
                "--out",
                str(tmp_path / "r"),
            ],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    assert_clean_failure(result)
    assert (
        result.stderr.strip().count("\n") == 0 and "error: cannot write to standard output" in result.stderr
    )
