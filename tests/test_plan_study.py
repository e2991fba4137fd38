"""scripts/plan_study.py's command line: a wrong argument is one line and exit status 2, never a table of
impossible rates (--cases -3 printed a family-wise error of 1.000 with exit 0) or a traceback."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "plan_study.py"


def _main():
    spec = importlib.util.spec_from_file_location("plan_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--cases", "-3"], "error: --cases -3: each must be a whole number >= 2"),
        (["--cases", "abc"], "error: --cases abc: expected whole numbers separated by commas (e.g. 6,10,14)"),
        (["--looks", "10,5"], "error: --looks 10,5: the seeds at each look must increase (e.g. 6,10,14)"),
        (["--looks", "6,x"], "error: --looks 6,x: expected whole numbers separated by commas (e.g. 6,10,14)"),
        (
            ["--studies", "0"],
            "plan_study.py: error: argument --studies: expected a whole number >= 1, got 0 (plan_study.py --help "
            "lists the options)",
        ),
        (
            ["--experiment", "nosuch"],
            "error: --experiment nosuch: no such preset; the options: norm_study_gpu, ",
        ),
        (["--config-dir", "/no/such/folder"], "error: --config-dir /no/such/folder: no such folder"),
    ],
)
def test_a_wrong_argument_is_one_line_and_exit_2(args: list[str], line: str, tmp_path: Path, capsys) -> None:
    argv = [str(tmp_path), "--experiment", "norm_sweep_quick", *args]
    with pytest.raises(SystemExit) as stop:
        _main()(argv)
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and err.startswith(line) and err.count("\n") == 1, err
    assert out == ""


def test_a_preset_of_your_own_config_dir_is_sized(tmp_path: Path) -> None:
    """sweeps.md: a study of your own lives in DIR/experiment/; the script read only configs/experiment/."""
    spec = importlib.util.spec_from_file_location("plan_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    preset = SCRIPT.parents[1] / "configs" / "experiment" / "norm_sweep_quick.yaml"
    (tmp_path / "experiment").mkdir()
    text = preset.read_text().replace("looks: [5, 11, 17]", "looks: [4, 8]")
    (tmp_path / "experiment" / "my_study.yaml").write_text(text)
    design = module.preset_design("my_study", tmp_path)
    assert design.looks == (4, 8) and len(design.questions) == 5
