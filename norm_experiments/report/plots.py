"""PNG plots: metric vs batch size per norm, and BatchNorm's evaluation-mode gap.

Figures are built with matplotlib's object API and the Agg canvas rather than pyplot, so that writing a
report never changes the global backend of a process that imported us (a notebook, a Hydra callback).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from norm_experiments.report.analysis import Analysis, Summary
from norm_experiments.report.cells import EVAL_MODE_LABELS
from norm_experiments.report.verdicts import Verdict

MARKERS = "osD^vP*Xh<>p"
PALETTE = [
    "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
    "tab:pink", "tab:gray", "tab:olive", "tab:cyan", "black",
]  # fmt: skip
# The names TensorBoard's HParams view gives the same scores (training/tensorboard.py METRICS).
METRIC_WORDS = {"val_dice": "Dice (model.eval())", "val_hd95": "HD95 mm (model.eval())"}
MODE_COLORS = {"running": "tab:red", "precise": "tab:orange", "batch": "tab:green"}
ERRORBAR_NOTE = "error bars: 95% interval of the cell mean (seeds × cases; the interval table's)"

# Lines at the same batch size are shifted by this fraction of an octave so their error bars don't overlap.
_DODGE = 0.04


def norm_colors(analysis: Analysis) -> dict[str, str]:
    """One colour per norm, the same in every plot of a report (the report stays torch-free: no registry)."""
    norms = sorted({c.norm for s in analysis.conditions for c in s.cells.values()})
    return {norm: PALETTE[i % len(PALETTE)] for i, norm in enumerate(norms)}


def _row_norm(summary: Summary, row: str) -> str:
    """The norm of a row ("batch [accumulate 4]" is batch)."""
    return next((c.norm for c in summary.cells.values() if c.row == row), row)


def _metric_words(metric: str) -> str:
    return METRIC_WORDS.get(metric, metric)


def _seed_points(ax: Axes, summary: Summary, row: str, offset: float, color: str) -> list[float]:
    """Each seed's value as a small hollow point beside the mean; returns the values drawn."""
    xs, ys = [], []
    for bs in summary.batch_sizes:
        cell = summary.cell(row, bs)
        if cell is not None:
            values = list(cell.values().by_seed.values())
            xs += [bs * 2.0**offset] * len(values)
            ys += values
    if xs:
        ax.scatter(xs, ys, s=14, facecolors="none", edgecolors=color, linewidths=0.8, alpha=0.7, zorder=3)
    return ys


def _log2_batch_axis(ax: Axes, batch_sizes: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(batch_sizes)
    ax.set_xticklabels([str(bs) for bs in batch_sizes])
    ax.xaxis.set_minor_locator(NullLocator())
    if batch_sizes:
        ax.set_xlim(min(batch_sizes) / 1.3, max(batch_sizes) * 1.3)
    ax.set_xlabel("batch size (volumes per step, log2 axis)")
    ax.grid(True, alpha=0.3)


def _plot_line(ax: Axes, bars: list[tuple[int, float, float, float]], offset: float, **style) -> bool:
    """One line with error bars (cell_bars); returns whether any point has no interval (a single seed)."""
    if not bars:
        return False
    xs = [bs * 2.0**offset for bs, _, _, _ in bars]
    ys = [mean for _, mean, _, _ in bars]
    # The point is the mean of the records' own values, the bar the seeds x cases interval (cell_interval):
    # where a record's summary differs from the mean of its per-case scores (classes absent from some cases),
    # the point can lie outside the bar; the bar then reaches the point (matplotlib refuses a negative error).
    err = [
        [max(0.0, mean - low) for _, mean, low, _ in bars],
        [max(0.0, high - mean) for _, mean, _, high in bars],
    ]
    ax.errorbar(xs, ys, yerr=err, capsize=3, linewidth=1.8, markersize=6, **style)
    return any(low == high for _, _, low, high in bars)


def _suptitle(fig: Figure, text: str) -> None:
    """The figure's title, wrapped to its width (a one-panel figure would cut a long line off)."""
    chars = int(fig.get_figwidth() * 13)
    fig.suptitle(_plain("\n".join(textwrap.fill(line, chars) for line in text.split("\n"))), fontsize=10)


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)
    return path


def _offset(index: int, count: int) -> float:
    return (index - (count - 1) / 2) * _DODGE


def _panels(count: int, width: float = 5.0, rows: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * count, 4.5 * rows), layout="constrained")
    axes = fig.subplots(rows, count, sharey=True, squeeze=False)
    return fig, [list(r) for r in axes]


def _plain(text: str) -> str:
    """Text from the records (norm names, conditions) drawn as it is: matplotlib reads $...$ as a formula and
    fails on one it cannot parse."""
    return text.replace("$", r"\$")


def _title(ax: Axes, summary: Summary) -> None:
    """A panel is titled by its condition; a report with one condition has no panel title."""
    if summary.condition:
        ax.set_title(_plain(summary.condition), fontsize=10)


def cell_bars(summary: Summary, row: str, clip: bool = True) -> list[tuple[int, float, float, float]]:
    """(batch size, mean, low, high) of each cell of a row: the cell's one interval (cells.cell_interval,
    also in the interval table and results.csv), clipped to [0, 1] for a score (not for a distance)."""
    low, high = (0.0, 1.0) if clip else (-math.inf, math.inf)
    bars = []
    for bs in summary.batch_sizes:
        cell = summary.cell(row, bs)
        if cell is not None and cell.metric is not None:
            iv = cell.metric
            bars.append((bs, iv.mean, max(iv.low, low), min(iv.high, high)))
    return bars


def clipped(metric: str) -> bool:
    """Whether a metric's bars are clipped to [0, 1]: a Dice score; a distance, a rate or a time is not."""
    return "dice" in metric


def _fit_y(ax: Axes, values: list[float], clip: bool) -> None:
    """Fit the y axis to what is drawn (a fixed 0-1 axis makes close norms overlap)."""
    if not values:
        return
    lo, hi = min(values), max(values)
    pad = max(0.02, 0.08 * (hi - lo))
    ax.set_ylim(max(lo - pad, 0.0) if clip else lo - pad, min(hi + pad, 1.0) if clip else hi + pad)


def plot_metric_vs_batch_size(analysis: Analysis, path: Path) -> Path:
    """x = batch size (log2), y = metric, one line per norm with 95% interval error bars; a panel per
    condition."""
    fig, axes = _panels(len(analysis.conditions), width=6.5)
    colors = norm_colors(analysis)
    any_single = False
    clip = clipped(analysis.metric)
    for ax, summary in zip(axes[0], analysis.conditions, strict=True):
        drawn: list[float] = []
        for i, row in enumerate(summary.rows):
            bars = cell_bars(summary, row, clip)
            color = colors[_row_norm(summary, row)]
            style = {"marker": MARKERS[i % len(MARKERS)], "label": _plain(row), "color": color}
            offset = _offset(i, len(summary.rows))
            any_single |= _plot_line(ax, bars, offset, **style)
            drawn += _seed_points(ax, summary, row, offset, color)
            drawn += [v for _, _, low, high in bars for v in (low, high)]
        _log2_batch_axis(ax, summary.batch_sizes)
        _fit_y(ax, drawn, clip)
        _title(ax, summary)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(title="norm", fontsize=9, loc="best")
        else:
            # An all-failed sweep still gets a plot, so report.md never links to a missing file.
            ax.text(0.5, 0.5, "no completed runs yet", transform=ax.transAxes, ha="center", va="center")
    axes[0][0].set_ylabel(_metric_words(analysis.metric))
    note = (
        ERRORBAR_NOTE
        + (", clipped to [0, 1]" if clip else "")
        + ("; n=1 points have none" if any_single else "")
    )
    _suptitle(
        fig,
        f"{_metric_words(analysis.metric)} vs batch size\nmean over seeds, hollow points: each seed; {note}",
    )
    return _save(fig, path)


def plot_bn_eval_gap(analysis: Analysis, path: Path) -> Path | None:
    """One panel per BN-family norm and condition: the metric per batch size for each evaluation mode.

    Returns None (and writes nothing) if no run reported eval modes.
    """
    bn_rows = sorted({r for s in analysis.conditions for r in s.bn_rows if _has_modes(s, r)})
    if not bn_rows:
        return None
    fig, axes = _panels(len(analysis.conditions), rows=len(bn_rows))
    any_single = False
    for grid_row, row in zip(axes, bn_rows, strict=True):
        for ax, summary in zip(grid_row, analysis.conditions, strict=True):
            for i, mode in enumerate(summary.eval_modes):
                points = [
                    (bs, iv.mean, max(iv.low, 0.0), min(iv.high, 1.0))
                    for bs in summary.batch_sizes
                    if (cell := summary.cell(row, bs)) is not None and (iv := cell.eval_modes.get(mode))
                ]
                style = {
                    "marker": MARKERS[i % len(MARKERS)],
                    "label": f"eval with {EVAL_MODE_LABELS.get(mode, mode)}",
                    "color": MODE_COLORS.get(mode),
                }
                any_single |= _plot_line(ax, points, _offset(i, len(summary.eval_modes)), **style)
            _log2_batch_axis(ax, summary.batch_sizes)
            where = f"; {summary.condition}" if summary.condition else ""
            ax.set_title(_plain(f"norm = {row}{where}"), fontsize=10)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8, loc="best")
        grid_row[0].set_ylabel("Dice")  # eval_modes are always validation Dice, whatever --metric is
    note = ERRORBAR_NOTE + ", clipped to [0, 1]" + ("; n=1 points have none" if any_single else "")
    _suptitle(fig, f"BatchNorm family: same weights, different evaluation statistics\n{note}")
    return _save(fig, path)


def _has_modes(summary: Summary, row: str) -> bool:
    return any(c.eval_modes for c in summary.cells.values() if c.row == row)


def plot_reference_differences(analysis: Analysis, path: Path) -> Path | None:
    """Each norm minus the reference norm (same batch size and seed), with the paired 95% interval; a panel
    per condition. Returns None when no condition holds the reference norm."""
    if not any(s.deltas.comparisons for s in analysis.conditions):
        return None
    fig, axes = _panels(len(analysis.conditions), width=6.5)
    colors = norm_colors(analysis)
    starred = False
    for ax, summary in zip(axes[0], analysis.conditions, strict=True):
        comparisons = summary.deltas.comparisons
        labels = sorted({d.label for d in comparisons})
        for i, label in enumerate(labels):
            found = [d for d in comparisons if d.label == label and d.low is not None and d.high is not None]
            xs = [d.batch_size * 2.0 ** _offset(i, len(labels)) for d in found]
            ys = [d.difference for d in found]
            err = [[d.difference - d.low for d in found], [d.high - d.difference for d in found]]  # type: ignore[operator]
            color = colors.get(_row_norm(summary, label), "black")
            if found:
                ax.errorbar(
                    xs,
                    ys,
                    yerr=err,
                    capsize=3,
                    linewidth=1.5,
                    marker=MARKERS[i % len(MARKERS)],
                    label=_plain(label),
                    color=color,
                )
                # A difference whose interval excludes 0 (better or worse): a star above its point.
                marked = [
                    (x, y) for x, y, d in zip(xs, ys, found) if d.verdict in (Verdict.BETTER, Verdict.WORSE)
                ]
                if marked:
                    ax.scatter(*zip(*marked), marker="*", s=120, color=color, edgecolors="black", zorder=4)
                    starred = True
        ax.axhline(0.0, color="black", linewidth=0.8)
        margin = summary.deltas.margin
        if margin:  # the equivalence margin: an interval inside the band is "equivalent"
            ax.axhspan(-margin, margin, color="grey", alpha=0.15, linewidth=0, label=f"±{margin:g} margin")
        _log2_batch_axis(ax, summary.batch_sizes)
        _title(ax, summary)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    axes[0][0].set_ylabel(_plain(f"{_metric_words(analysis.metric)} − {analysis.reference}"))
    star = "; ★: the interval excludes 0 (better or worse)" if starred else ""
    _suptitle(
        fig,
        f"Difference to {analysis.reference} at the same batch size and seed\nerror bars: the family-adjusted "
        f"intervals of the difference table; grey band: the equivalence margin{star}",
    )
    return _save(fig, path)
