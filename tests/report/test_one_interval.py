"""One number per quantity: a cell's 95% interval is the same in the interval table, results.csv and the
main plot's error bars (they used to differ: a t-interval over seeds in the plot and the CSV, the seeds x
cases model in the table)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

from norm_experiments.report import write_report
from norm_experiments.report.plots import cell_bars
from norm_experiments.report.stats import t_interval
from norm_experiments.report.tables import ci_table
from tests.report.conftest import grid


def t_low_high(values: list[float]) -> tuple[float, float]:
    found = t_interval(values)
    return max(found.low, 0.0), min(found.high, 1.0)


def test_table_csv_and_plot_show_the_same_interval(tmp_path: Path, write_cases) -> None:
    sweep = tmp_path / "sweep"
    write_cases(sweep, "batch", 1, grid(0.6, lambda s, c: 0.03 * s * c), batch=grid(0.7))
    write_cases(sweep, "instance", 1, grid(0.8, lambda s, c: -0.02 * c * (s - 1)))
    report = write_report([sweep])
    summary = report.analysis.conditions[0]

    table = {}  # row -> (mean, low, high), as the interval table prints them
    for line in ci_table(summary).splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        found = re.match(r"([\d.]+) \[([\d.]+), ([\d.]+)\]", cells[1])
        assert found, line
        table[cells[0]] = tuple(float(x) for x in found.groups())
    with open(sweep / "results.csv") as f:
        rows = {r["norm"]: r for r in csv.DictReader(f)}

    for norm in ("batch", "instance"):
        (bs, mean, low, high) = cell_bars(summary, norm)[0]
        csv_row = rows[norm]
        assert bs == 1
        assert float(csv_row["val_dice_ci95_low"]) == round(low, 6)  # results.csv keeps 6 digits
        assert float(csv_row["val_dice_ci95_high"]) == round(high, 6)
        assert csv_row["val_dice_ci95_method"] == "seeds × cases"
        assert table[norm] == (round(mean, 3), round(low, 3), round(high, 3))
        # the model's interval (seeds x cases), not the t-interval over the 3 seed means
        seed_means = list(summary.cell(norm, 1).values().by_seed.values())  # type: ignore[union-attr]
        assert len(seed_means) == 3 and (low, high) != t_low_high(seed_means)
    assert (sweep / "dice_vs_batch_size.png").stat().st_size > 0


def test_names_with_dollar_signs_are_drawn_as_text(tmp_path: Path, write_cases) -> None:
    """matplotlib reads $...$ as a formula: a norm named a$\\frac{b$ failed the whole report."""
    sweep = tmp_path / "sweep"
    write_cases(sweep, "instance", 1, grid(0.8))
    write_cases(sweep, "a$\\frac{b$", 1, grid(0.7))
    report = write_report([sweep], reference="instance")
    assert (sweep / "dice_vs_batch_size.png").stat().st_size > 0
    assert "a$\\frac{b$" in report.markdown


def test_a_metric_that_is_not_a_score_is_plotted_unclipped(tmp_path: Path, write_run) -> None:
    """--metric samples_per_s used to draw an empty plot: every value was clipped to [0, 1]."""
    from norm_experiments.report.plots import cell_bars, clipped

    sweep = tmp_path / "sweep"
    for seed, rate in enumerate((40.0, 44.0, 48.0)):
        write_run(sweep, "group", 1, seed, samples_per_s=rate)
    report = write_report([sweep], metric="samples_per_s")
    assert clipped("val_dice") and clipped("eval_batch_dice") and not clipped("samples_per_s")
    (bars,) = [cell_bars(s, "group", clipped(report.analysis.metric)) for s in report.analysis.conditions]
    assert bars[0][1] == 44.0 and bars[0][2] < 44.0 < bars[0][3]
