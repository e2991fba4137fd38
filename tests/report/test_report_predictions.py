"""The report links, per cell, the worst validation case of the runs that saved predictions."""

from __future__ import annotations

from pathlib import Path

from norm_experiments.report import write_report
from tests.report.conftest import CASES


def test_worst_case_per_cell_is_linked_relative_to_the_document(tmp_path: Path, write_cases) -> None:
    sweep = tmp_path / "sweep"
    # Rows are seeds, columns CASES: seed 1's third case is the worst of the batch cell.
    write_cases(sweep, "batch", 1, [[0.8, 0.7, 0.6, 0.9], [0.8, 0.7, 0.2, 0.9], [0.8, 0.7, 0.5, 0.9]])
    write_cases(sweep, "group", 1, [[0.8, 0.75, 0.7, 0.9], [0.8, 0.7, 0.6, 0.9], [0.8, 0.7, 0.65, 0.9]])
    for seed in range(3):
        (sweep / f"runs/batch/1/{seed}" / "predictions").mkdir()
    # group runs saved no predictions: the group cell has no worst case to link
    report = write_report([sweep], doc=tmp_path / "docs" / "results.md")
    section = report.markdown.split("## Worst cases to look at", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("- ")]
    link = f"../sweep/runs/batch/1/1/predictions/{CASES[2]}"
    assert lines == [f"- batch, bs 1: [{CASES[2]}]({link}) of `norm=batch,bs=1,seed=1`, Dice 0.200"], lines
    assert (tmp_path / "docs" / link).resolve() == (sweep / "runs/batch/1/1/predictions" / CASES[2]).resolve()


def test_no_predictions_no_section(tmp_path: Path, write_cases) -> None:
    sweep = tmp_path / "sweep"
    write_cases(sweep, "batch", 1, [[0.8, 0.7, 0.6, 0.9], [0.8, 0.7, 0.2, 0.9]])
    assert "Worst cases" not in write_report([sweep]).markdown


def test_a_norm_keeps_its_colour_in_every_plot(tmp_path: Path, write_cases) -> None:
    from norm_experiments.report import build_report
    from norm_experiments.report.plots import norm_colors

    sweep = tmp_path / "sweep"
    for norm in ("batch", "group", "instance"):
        write_cases(sweep, norm, 1, [[0.8, 0.7, 0.6, 0.9], [0.8, 0.7, 0.2, 0.9]])
    colors = norm_colors(build_report([sweep]).analysis)
    assert list(colors) == ["batch", "group", "instance"] and len(set(colors.values())) == 3
    write_cases(sweep, "layer", 2, [[0.8, 0.7, 0.6, 0.9], [0.8, 0.7, 0.2, 0.9]])
    assert norm_colors(build_report([sweep]).analysis)["batch"] == colors["batch"]
