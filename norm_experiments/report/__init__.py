"""Sweep report: read every run's metrics.json and say which normalization to use at which batch size.

from norm_experiments.report import write_report
report = write_report([Path("outputs/sweeps/norm_sweep_quick")])
print(report.table)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from norm_experiments.report import csvfiles, curves, document, html_report, plots, summary_json, tables
from norm_experiments.report.analysis import DEFAULT_REFERENCE, Analysis, analyze
from norm_experiments.report.collect import Collection, collect
from norm_experiments.report.primary import read_study
from norm_experiments.report.primary_text import console_lines
from norm_experiments.report.publish import publish, staging
from norm_experiments.report.verdicts import DEFAULT_MARGIN

__all__ = ["Report", "build_report", "file_names", "write_report"]


@dataclass
class Report:
    """What write_report produced: the numbers, the markdown tables and the files written."""

    collection: Collection
    analysis: Analysis
    markdown: str  # the full report text
    out_dir: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)  # "report.md" -> path, ...

    @property
    def table(self) -> str:
        """The main metric table of every condition (what the CLI and the sweep callback print)."""
        parts = ["\n".join(console_lines(p)) for p in self.analysis.primary]
        for summary in self.analysis.conditions:
            title = f"{summary.condition}\n" if summary.condition else ""
            parts.append(title + tables.metric_table(summary))
        return "\n\n".join(parts)

    @property
    def warnings(self) -> list[str]:
        """Lines worth showing on stderr: unreadable files and duplicate runs."""
        lines = [f"unreadable metrics.json: {path} ({why})" for path, why in self.collection.unreadable]
        return lines + self.collection.warnings + self.analysis.notes


def analyze_with_study(collection: Collection, metric: str, reference: str, margin: float) -> Analysis:
    """analyze(), with the declared questions of the sweep folders' study.json when there is one."""
    study = read_study(collection.sweep_dirs)
    if study is None:
        return analyze(collection, metric, reference, margin)
    return analyze(
        collection,
        metric,
        reference,
        margin,
        design=study.design,
        stopped=study.stopped,
        minutes=study.minutes,
    )


def build_report(
    sweep_dirs: list[Path],
    metric: str = "val_dice",
    reference: str = DEFAULT_REFERENCE,
    margin: float = DEFAULT_MARGIN,
) -> Report:
    """Collect and analyze without writing anything (the text has no plot links)."""
    collection = collect(sweep_dirs)
    analysis = analyze_with_study(collection, metric, reference, margin)
    return Report(collection, analysis, document.render_markdown(analysis, collection, plots={}))


@contextmanager
def _naming(final: Path, stage: Path) -> Iterator[None]:
    """An OSError while a file of the report is written names that file where it was going (`final`): a
    failed write or close (a full disk) carries no file name, and the staging folder is removed afterwards."""
    try:
        yield
    except OSError as err:
        if err.filename is None or Path(err.filename).parent == stage:
            raise OSError(err.errno, err.strerror or str(err), str(final)) from err
        raise


def file_names(reference: str, doc: Path | None) -> list[str]:
    """The names write_report may write into its folder (for --doc: beside the document, its own two aside)."""
    names = ["results.csv", "runs.csv", summary_json.FILENAME, "dice_vs_batch_size.png", "bn_eval_gap.png"]
    names += [f"difference_to_{reference}.png", curves.FILENAME]
    return names if doc is not None else [*names, "report.md", "report.html"]


def write_report(
    sweep_dirs: list[Path],
    out_dir: Path | None = None,
    metric: str = "val_dice",
    reference: str = DEFAULT_REFERENCE,
    doc: Path | None = None,
    header: list[str] | None = None,
    margin: float = DEFAULT_MARGIN,
) -> Report:
    """Write report.md, report.html (the same, with its plots embedded), results.csv, runs.csv, summary.json and
    the plots (learning_curves.png where runs recorded curves) to out_dir (default: the first sweep dir).

    With `doc` (e.g. docs/results.md) the markdown goes to that file instead, with `header` lines at its
    top, and the CSVs and plots into the folder beside it named after it (docs/results/).
    Every file is written into a staging folder first and renamed into place under a lock (publish.py).
    Raises norm_experiments.errors.UserError if a sweep dir is missing or holds no metrics.json, and OSError
    when the files cannot be written (nothing of the new report is then in place).
    """
    collection = collect(sweep_dirs)
    analysis = analyze_with_study(collection, metric, reference, margin)
    if doc is not None:
        doc = Path(doc)
        out_dir, markdown_path = doc.parent / doc.stem, doc
    else:
        out_dir = Path(out_dir) if out_dir is not None else collection.sweep_dirs[0]
        markdown_path = out_dir / "report.md"
    with staging(out_dir) as stage:
        with _naming(out_dir / "results.csv", stage):
            csvfiles.write_results_csv(analysis, stage / "results.csv")
        with _naming(out_dir / "runs.csv", stage):
            csvfiles.write_runs_csv(collection.runs, stage / "runs.csv")
        with _naming(out_dir / "dice_vs_batch_size.png", stage):
            figures = {
                f"{metric} vs batch size": plots.plot_metric_vs_batch_size(
                    analysis, stage / "dice_vs_batch_size.png"
                )
            }
        with _naming(out_dir / f"difference_to_{reference}.png", stage):
            difference = plots.plot_reference_differences(analysis, stage / f"difference_to_{reference}.png")
        if difference is not None:
            figures[f"difference to {reference}"] = difference
        with _naming(out_dir / "bn_eval_gap.png", stage):
            gap = plots.plot_bn_eval_gap(analysis, stage / "bn_eval_gap.png")
        if gap is not None:
            figures["BatchNorm evaluation modes"] = gap
        with _naming(out_dir / curves.FILENAME, stage):
            learning = curves.plot_learning_curves(analysis, stage / curves.FILENAME)
        for summary, note in learning.notes:  # runs whose curves were left out: the report's notes say so
            summary.notes.append(note)
        if learning.path is not None:
            figures["learning curves"] = learning.path
        with _naming(out_dir / summary_json.FILENAME, stage):
            summary_json.write_summary_json(analysis, collection, stage / summary_json.FILENAME)
        final = {name: out_dir / name for name in ("results.csv", "runs.csv", summary_json.FILENAME)}
        final.update({path.name: out_dir / path.name for path in figures.values()})
        links = {
            caption: (out_dir / path.name).relative_to(markdown_path.parent)
            for caption, path in figures.items()
        }
        markdown = document.render_markdown(analysis, collection, links, header, markdown_path.parent)
        # report.html beside the markdown, so that the same relative links hold; its plots are embedded.
        html_path = markdown_path.with_suffix(".html")
        with _naming(html_path, stage):
            embedded = {str(links[caption]): path for caption, path in figures.items()}
            html_report.write_html(markdown, embedded, stage / html_path.name)
        with _naming(markdown_path, stage):
            (stage / markdown_path.name).write_text(markdown, encoding="utf-8")
        moves = [(stage / name, path) for name, path in final.items()]
        documents = [(stage / html_path.name, html_path), (stage / markdown_path.name, markdown_path)]
        ours = [path.name for path in [*final.values(), html_path, markdown_path] if path.parent == out_dir]
        publish(moves + documents, lock_dir=out_dir, written=ours, documents=len(documents))
    files = {**final, html_path.name: html_path, markdown_path.name: markdown_path}
    return Report(collection, analysis, markdown, out_dir, files)
