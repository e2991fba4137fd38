"""resume=RUN_DIR on a run folder someone else crafted: its .hydra/overrides.yaml becomes part of a Hydra
command line, so anything but a plain key=value of configs/ is refused in one line, before Hydra starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from norm_experiments.config import CONFIG_DIR
from tests.helpers import assert_clean_failure, run_cli

# Subprocess runs of the real CLI or trainings: the full suite runs them, `pytest -m "not slow"` does not.
pytestmark = pytest.mark.slow


@pytest.fixture
def evil(tmp_path: Path) -> tuple[Path, Path]:
    """A config that would write `marker` through a Hydra callback or a _target_ if Hydra ever loaded it."""
    marker = tmp_path / "marker"
    body = (
        "# @package _global_\n"
        f"hydra:\n  callbacks:\n    x:\n      _target_: builtins.open\n      file: {marker}\n      mode: w\n"
        f"x:\n  _target_: builtins.open\n  file: {marker}\n  mode: w\n"
    )
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "evil.yaml").write_text(body)
    return tmp_path / "evil" / "evil.yaml", marker


CRAFTED = {
    "config-dir": ["--config-dir={dir}", "--config-name=evil"],
    "cp-cn": ["-cp", "{dir}", "-cn", "evil"],
    "group path": ["experiment={relative}"],
    "env": ["data.root=${{oc.env:HOME}}"],
    "resolver in quotes": ["name='${{oc.env:HOME}}'"],
    "hydra key": ["+hydra.callbacks.x._target_=builtins.print"],
    "target": ["+model.x={{_target_: builtins.open, file: {marker}, mode: w}}"],
    "package": ["norm@hydra.callbacks=batch"],
    "sweep": ["seed=1,2"],
    "not a list": None,
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_overrides_are_refused_before_hydra(
    case: str, evil: tuple[Path, Path], tmp_path: Path
) -> None:
    evil_file, marker = evil
    relative = Path("../" * len((CONFIG_DIR / "experiment").parts)) / str(evil_file.with_suffix("")).lstrip(
        "/"
    )
    assert (CONFIG_DIR / "experiment" / f"{relative}.yaml").resolve() == evil_file.resolve()
    run_dir = tmp_path / "outputs" / "runs" / "shared-run"
    (run_dir / ".hydra").mkdir(parents=True)
    lines = CRAFTED[case]
    if lines is None:
        text = "x: {a: 1}\n"
    else:
        fields = {"dir": evil_file.parent, "relative": relative, "marker": marker}
        text = yaml.safe_dump([line.format(**fields) for line in ["seed=0", *lines]])
    (run_dir / ".hydra" / "overrides.yaml").write_text(text)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = run_cli([f"resume={run_dir}"], cwd=tmp_path, timeout=120)
    assert_clean_failure(result, "resume=", "overrides.yaml")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written anywhere
