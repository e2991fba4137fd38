"""The study sweeper (hydra/sweeper=study) through the real CLI: seeds in looks, a cell whose questions are
decided is not run again, the sweep stops at the seed cap with the open question's seeds-to-decide, the
declared questions are printed first, and the same command again resumes without training anything."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.helpers import assert_clean_failure, run_cli

pytestmark = pytest.mark.slow

# Two questions on the smoke config: the first has a margin no interval can leave (decided as equivalent at
# the first look), the second one no interval can fit (open to the end).
PRESET = """# @package _global_
defaults:
  - smoke
  - override /hydra/sweeper: study
name: study
hydra:
  mode: MULTIRUN
  sweeper:
    study:
      looks: [2, 3]
      questions:
        batch_vs_instance:
          text: Is BatchNorm within a huge margin of InstanceNorm?
          margin: 1000
          a: {norm: batch, batch_size: 1}
          b: {norm: instance, batch_size: 1}
        group_vs_instance:
          margin: 1.0e-9
          a: {norm: group, batch_size: 1}
          b: {norm: instance, batch_size: 1}
trainer:
  num_threads: 1
"""


def seeds_by_cell(sweep_dir: Path) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for path in sweep_dir.rglob("metrics.json"):
        record = json.loads(path.read_text())
        found.setdefault(f"{record['norm']}@{record['batch_size']}", []).append(record["seed"])
    return {cell: sorted(seeds) for cell, seeds in found.items()}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory):
    cwd = tmp_path_factory.mktemp("study")
    (cwd / "conf" / "experiment").mkdir(parents=True)
    (cwd / "conf" / "experiment" / "study_test.yaml").write_text(PRESET)
    args = ["--config-dir", str(cwd / "conf"), "experiment=study_test"]
    return cwd, args, run_cli(args, cwd=cwd)


def test_looks_skip_decided_cells_and_stop_at_the_seed_cap(study) -> None:
    cwd, _, result = study
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = cwd / "outputs" / "sweeps" / "study"
    # Look 1: seeds 0-1 of the three cells; batch_vs_instance is decided, so look 2 (seed 2) runs only the
    # cells of the open question.
    assert seeds_by_cell(sweep_dir) == {"batch@1": [0, 1], "instance@1": [0, 1, 2], "group@1": [0, 1, 2]}
    names = sorted(str(p.parent.relative_to(sweep_dir)) for p in sweep_dir.rglob("metrics.json"))
    assert names[0] == "norm=batch/data.batch_size=1,seed=0"  # grouped by norm, only what differs
    # progress: look 1 launches 6 runs, look 2 adds the 2 runs of the open question's cells
    assert "[sweep] run 1 of 6 started: " in result.stdout and "[sweep] run 6 of 6 done: " in result.stdout
    assert "[sweep] run 8 of 8 done: " in result.stdout
    study_file = json.loads((sweep_dir / "study.json").read_text())
    assert study_file["stopped"] == "seed cap: the last look was taken"
    assert list(study_file["design"]["questions"]) == ["batch_vs_instance", "group_vs_instance"]


def test_the_declared_questions_are_printed_first_with_their_verdicts(study) -> None:
    _, _, result = study
    out = result.stdout
    first = out.index("Declared questions:")
    assert first < out.index("| norm |")
    assert "batch_vs_instance: equivalent within ±1000" in out
    assert "group_vs_instance: inconclusive (open)" in out
    assert "1 question(s) open; the sweep stopped: seed cap" in out
    report = (study[0] / "outputs" / "sweeps" / "study" / "report.md").read_text()
    assert (
        report.index("## Declared questions") < report.index("## Reading") < report.index("**Exploratory.**")
    )
    assert "| batch_vs_instance | batch, bs 1 minus instance, bs 1 | 1 of 2 (2 seeds) |" in report
    assert "| group_vs_instance | group, bs 1 minus instance, bs 1 | 2 of 2 (3 seeds) |" in report


def test_the_same_command_again_trains_nothing_and_answers_the_same(study) -> None:
    cwd, args, first = study
    sweep_dir = cwd / "outputs" / "sweeps" / "study"
    before = {p: p.stat().st_mtime for p in sweep_dir.rglob("metrics.json")}
    again = run_cli(args, cwd=cwd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime for p in sweep_dir.rglob("metrics.json")} == before
    assert "skipped (already completed)" in again.stdout + again.stderr
    import re

    # The same answers; the sweep's minutes count both invocations (the time cap is the sweep's).
    ran = re.compile(r" The sweep ran (\d+\.\d) min\.")
    pick = lambda out: ran.sub("", out[out.index("Declared questions:") : out.index("| norm |")])  # noqa: E731
    assert pick(again.stdout) == pick(first.stdout)
    assert float(ran.search(again.stdout)[1]) >= float(ran.search(first.stdout)[1])
    # The lines after each look answer as they stood at that look, not with the later looks' runs the folder
    # already holds.
    line = re.compile(r"\] +\w+: \w+ [-+]\d\.\d{3} \[.*\] \((?:open|decided at look \d)\)")
    looks_first = line.findall(first.stdout + first.stderr)
    assert looks_first and line.findall(again.stdout + again.stderr) == looks_first


def test_a_swept_seed_or_a_cell_the_grid_lacks_is_one_line(study) -> None:
    cwd, args, _ = study
    result = run_cli([*args, "seed=0,1", "name=bad"], cwd=cwd)
    assert_clean_failure(result, "seed: the study sweeper runs the seeds itself")
    grid = "hydra.sweeper.params={norm: 'batch,instance', data.batch_size: '1'}"
    result = run_cli([*args, grid, "name=bad"], cwd=cwd)
    assert_clean_failure(result, "hydra.sweeper.study.questions.group_vs_instance.a.norm=group")
    assert not (cwd / "outputs" / "sweeps" / "bad").exists() or not list(
        (cwd / "outputs" / "sweeps" / "bad").rglob("metrics.json")
    )


def test_a_refused_study_leaves_a_finished_ones_files_as_they_were(study, tmp_path: Path) -> None:
    """A command the study refuses (its grid lacks a question's cell), in the folder of a finished study, exits
    2 with one line and leaves that study's multirun.yaml (the report's provenance), progress and design as
    they were: checked by the sweeper (a preset from --config-dir) and before Hydra starts (ours)."""
    cwd, args, _ = study
    sweep_dir = cwd / "outputs" / "sweeps" / "study"
    kept = ("multirun.yaml", ".progress.json", "study.json")
    before = {name: (sweep_dir / name).read_bytes() for name in kept}
    grid = "hydra.sweeper.params={norm: 'batch,instance', data.batch_size: '1'}"
    result = run_cli([*args, grid], cwd=cwd)
    assert_clean_failure(result, "hydra.sweeper.study.questions.group_vs_instance.a.norm=group")
    assert "add it to hydra.sweeper.params" in result.stderr
    assert {name: (sweep_dir / name).read_bytes() for name in kept} == before
    # Our preset, refused before Hydra starts: nothing in its folder changes.
    finished = tmp_path / "outputs" / "sweeps" / "norm_sweep_quick"
    finished.mkdir(parents=True)
    (finished / "multirun.yaml").write_text("hydra: {overrides: {task: [experiment=norm_sweep_quick]}}\n")
    one_cell = ["experiment=norm_sweep_quick", "data=synthetic", "norm=batch", "data.batch_size=1"]
    result = run_cli(one_cell, cwd=tmp_path)
    assert_clean_failure(result, "the sweep runs norm batch; to train one cell of this study alone")
    assert sorted(p.name for p in finished.iterdir()) == ["multirun.yaml"]
    assert (finished / "multirun.yaml").read_text().startswith("hydra: {overrides")


def test_a_finished_studys_design_cannot_be_changed_but_its_time_cap_can(study) -> None:
    """Rerun with a wider margin and alpha, a finished study re-decided its open question as "equivalent" from
    the same runs and rewrote study.json: now one line, exit 2, before Hydra starts, and the files are kept."""
    cwd, args, _ = study
    sweep_dir = cwd / "outputs" / "sweeps" / "study"
    kept = ("multirun.yaml", ".progress.json", "study.json")
    before = {name: (sweep_dir / name).read_bytes() for name in kept}
    wider = [
        *args,
        "hydra.sweeper.study.alpha=0.45",
        "hydra.sweeper.study.questions.group_vs_instance.margin=0.9",
    ]
    result = run_cli(wider, cwd=cwd)
    assert_clean_failure(
        result, "changes alpha 0.05 -> 0.45, the questions;", "run the new design in a new folder"
    )
    assert len(result.stderr.strip().splitlines()) == 1
    assert {name: (sweep_dir / name).read_bytes() for name in kept} == before
    copy = cwd / "outputs" / "sweeps" / "study_capped"  # a copy: the other tests read the study as it ran
    shutil.copytree(sweep_dir, copy)
    capped = run_cli([*args, "hydra.sweeper.study.max_minutes=30", f"hydra.sweep.dir={copy}"], cwd=cwd)
    assert capped.returncode == 0, capped.stderr[-3000:]
    assert "skipped (already completed)" in capped.stdout + capped.stderr
    assert json.loads((copy / "study.json").read_text())["design"]["max_minutes"] == 30


def test_the_time_cap_counts_every_invocation_of_the_command(study) -> None:
    """A study stopped by its time cap, run again: it took the next look at once, timed from a look whose runs
    were all skipped, so the cap held for no rerun. Now the minutes of earlier invocations count (study.json),
    the rerun stops again saying how to go on, and a larger cap takes the look."""
    cwd, args, _ = study
    sweep_dir = cwd / "outputs" / "sweeps" / "study"
    capped = cwd / "outputs" / "sweeps" / "study_time_cap"
    shutil.copytree(sweep_dir, capped)
    for record in list(capped.rglob("metrics.json")):  # as the cap left it: look 1 (seeds 0-1) only
        if json.loads(record.read_text())["seed"] == 2:
            shutil.rmtree(record.parent)
    study_file = json.loads((capped / "study.json").read_text())
    study_file.update(stopped="time cap", minutes=5.0, seconds_per_run=30.0)
    (capped / "study.json").write_text(json.dumps(study_file))
    folder = f"hydra.sweep.dir={capped}"

    again = run_cli([*args, "hydra.sweeper.study.max_minutes=6", folder], cwd=cwd)
    assert again.returncode == 0, again.stderr[-3000:]
    out = again.stdout + again.stderr
    assert re.search(
        r"time cap: look 2 would end at about 6\.\d min of sweep, 5\.0 of them before this command", out
    )
    assert "the same command with a larger hydra.sweeper.study.max_minutes takes the next look" in out
    assert seeds_by_cell(capped) == {"batch@1": [0, 1], "instance@1": [0, 1], "group@1": [0, 1]}
    written = json.loads((capped / "study.json").read_text())
    assert (
        written["stopped"] == "time cap" and written["minutes"] >= 5.0 and written["seconds_per_run"] == 30.0
    )

    larger = run_cli([*args, "hydra.sweeper.study.max_minutes=30", folder], cwd=cwd)
    assert larger.returncode == 0, larger.stderr[-3000:]
    assert seeds_by_cell(capped) == {"batch@1": [0, 1], "instance@1": [0, 1, 2], "group@1": [0, 1, 2]}
    written = json.loads((capped / "study.json").read_text())
    assert written["stopped"] == "seed cap: the last look was taken" and written["minutes"] > 5.0
    assert 0 < written["seconds_per_run"] < 30.0  # the pace of the two runs this look trained
