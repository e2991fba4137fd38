"""Every option of every argparse command has help text (norm-exp-brain --noise had none), and the Hydra
commands answer --help without loading torch (seconds: norm-exp-train's --help loaded it)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from norm_experiments.data import brain, fetch, synth_cli
from norm_experiments.report import cli as report_cli


@pytest.mark.parametrize("module", [brain, fetch, synth_cli, report_cli])
def test_every_option_has_help_text(module) -> None:
    parser = module._parser()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help.strip(), f"{parser.prog} {action.option_strings or action.dest}"


@pytest.mark.parametrize(
    "module", ["norm_experiments.train", "norm_experiments.check", "norm_experiments.explain"]
)
def test_help_does_not_load_torch(module: str) -> None:
    """Measured by what is imported, not by a clock: torch's import is what took the seconds."""
    code = f"import sys; sys.argv = ['x', '--help']; import {module} as m\ntry:\n    m.main()\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "norm-exp-" in result.stdout  # the command's own help text
    assert result.stdout.strip().splitlines()[-1] == "False"
