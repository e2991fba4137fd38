"""Sweep report: read every run's metrics.json and say which normalization to use at which batch size.

from norm_experiments.report import write_report
report = write_report([Path("multirun/2025-01-01/12-00-00")])
print(report.table)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from norm_experiments.report import document, plots, tables
from norm_experiments.report.cells import Summary, summarize
from norm_experiments.report.collect import Collection, collect

__all__ = ["Report", "build_report", "write_report"]


@dataclass
class Report:
    """What write_report produced: the numbers, the markdown table and the files written."""

    collection: Collection
    summary: Summary
    table: str  # the markdown metric table (also printed by the CLI)
    markdown: str  # the full report.md text
    out_dir: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)  # "report.md" -> path, ...

    @property
    def warnings(self) -> list[str]:
        """Lines worth showing on stderr: unreadable files and duplicate runs."""
        lines = [f"unreadable metrics.json: {path} ({why})" for path, why in self.collection.unreadable]
        return lines + self.collection.warnings + self.summary.notes


def build_report(sweep_dirs: list[Path], metric: str = "val_dice") -> Report:
    """Collect and summarize without writing anything (report.md text has no plot links)."""
    collection = collect(sweep_dirs)
    summary = summarize(collection, metric)
    markdown = document.render_markdown(summary, collection, plots={})
    return Report(collection, summary, tables.metric_table(summary), markdown)


def write_report(sweep_dirs: list[Path], out_dir: Path | None = None, metric: str = "val_dice") -> Report:
    """Write report.md, results.csv, runs.csv and the plots to out_dir (default: the first sweep dir).

    Raises norm_experiments.errors.UserError if a sweep dir is missing or holds no metrics.json.
    """
    collection = collect(sweep_dirs)
    summary = summarize(collection, metric)
    out_dir = Path(out_dir) if out_dir is not None else collection.sweep_dirs[0]
    out_dir.mkdir(parents=True, exist_ok=True)

    files = {"results.csv": out_dir / "results.csv", "runs.csv": out_dir / "runs.csv"}
    tables.write_results_csv(summary, files["results.csv"])
    tables.write_runs_csv(collection.runs, files["runs.csv"])

    main_plot = plots.plot_metric_vs_batch_size(summary, out_dir / "dice_vs_batch_size.png")
    figures = {f"{metric} vs batch size": main_plot}
    gap = plots.plot_bn_eval_gap(summary, out_dir / "bn_eval_gap.png")
    if gap is not None:
        figures["BatchNorm evaluation modes"] = gap
    files.update({path.name: path for path in figures.values()})

    markdown = document.render_markdown(summary, collection, figures)
    files["report.md"] = out_dir / "report.md"
    files["report.md"].write_text(markdown, encoding="utf-8")
    return Report(collection, summary, tables.metric_table(summary), markdown, out_dir, files)
