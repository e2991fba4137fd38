"""PNG plots: metric vs batch size per norm, and BatchNorm's evaluation-mode gap.

Figures are built with matplotlib's object API and the Agg canvas rather than pyplot, so that writing a
report never changes the global backend of a process that imported us (a notebook, a Hydra callback).
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from norm_experiments.report.cells import EVAL_MODE_LABELS, Summary
from norm_experiments.report.stats import Interval

MARKERS = "osD^vP*Xh<>p"
MODE_COLORS = {"running": "tab:red", "precise": "tab:orange", "batch": "tab:green"}
ERRORBAR_NOTE = "error bars: 95% t-interval over seeds, clipped to [0, 1]"

# Lines at the same batch size are shifted by this fraction of an octave so their error bars don't overlap.
_DODGE = 0.04


def _log2_batch_axis(ax: Axes, batch_sizes: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(batch_sizes)
    ax.set_xticklabels([str(bs) for bs in batch_sizes])
    ax.xaxis.set_minor_locator(NullLocator())
    if batch_sizes:
        ax.set_xlim(min(batch_sizes) / 1.3, max(batch_sizes) * 1.3)
    ax.set_xlabel("batch size (volumes per step, log2 axis)")
    ax.grid(True, alpha=0.3)


def _plot_line(ax: Axes, points: list[tuple[int, Interval]], offset: float, **style) -> bool:
    """One line with error bars; returns whether any point has n=1 (drawn without an error bar).

    Dice lies in [0, 1]: with 2-3 seeds a t-interval reaches far beyond, so bars are clipped to that range
    (the numbers in results.csv are not)."""
    if not points:
        return False
    xs = [bs * 2.0**offset for bs, _ in points]
    ys = [iv.mean for _, iv in points]
    lower = [iv.mean - max(iv.low, 0.0) for _, iv in points]
    upper = [min(iv.high, 1.0) - iv.mean for _, iv in points]
    ax.errorbar(xs, ys, yerr=[lower, upper], capsize=3, linewidth=1.8, markersize=6, **style)
    return any(not iv.has_spread for _, iv in points)


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)
    return path


def _offset(index: int, count: int) -> float:
    return (index - (count - 1) / 2) * _DODGE


def plot_metric_vs_batch_size(summary: Summary, path: Path) -> Path:
    """x = batch size (log2), y = metric, one line per norm with 95% interval error bars."""
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    any_single = False
    for i, row in enumerate(summary.rows):
        points = [
            (bs, cell.metric)
            for bs in summary.batch_sizes
            if (cell := summary.cell(row, bs)) is not None and cell.metric is not None
        ]
        style = {"marker": MARKERS[i % len(MARKERS)], "label": row}
        any_single |= _plot_line(ax, points, _offset(i, len(summary.rows)), **style)
    _log2_batch_axis(ax, summary.batch_sizes)
    ax.set_ylim(0.0, 1.02)
    ax.set_ylabel("val Dice (eval mode)" if summary.metric == "val_dice" else summary.metric)
    note = ERRORBAR_NOTE + ("; n=1 points have none" if any_single else "")
    ax.set_title(f"{summary.metric} vs batch size (mean over seeds; {note})", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(title="norm", fontsize=9, loc="best")
    else:
        # An all-failed sweep still gets a plot, so report.md never links to a missing file.
        ax.text(0.5, 0.5, "no completed runs yet", transform=ax.transAxes, ha="center", va="center")
    return _save(fig, path)


def plot_bn_eval_gap(summary: Summary, path: Path) -> Path | None:
    """One panel per BN-family norm: the metric per batch size for each evaluation mode.

    Returns None (and writes nothing) if no run reported eval modes.
    """
    rows = [r for r in summary.bn_rows if any(c.eval_modes for c in summary.cells.values() if c.row == r)]
    if not rows:
        return None
    fig = Figure(figsize=(5 * len(rows), 4.5), layout="constrained")
    axes = fig.subplots(1, len(rows), sharey=True, squeeze=False)[0]
    any_single = False
    for ax, row in zip(axes, rows, strict=True):
        for i, mode in enumerate(summary.eval_modes):
            points = [
                (bs, cell.eval_modes[mode])
                for bs in summary.batch_sizes
                if (cell := summary.cell(row, bs)) is not None and mode in cell.eval_modes
            ]
            style = {
                "marker": MARKERS[i % len(MARKERS)],
                "label": f"eval with {EVAL_MODE_LABELS.get(mode, mode)}",
                "color": MODE_COLORS.get(mode),
            }
            any_single |= _plot_line(ax, points, _offset(i, len(summary.eval_modes)), **style)
        _log2_batch_axis(ax, summary.batch_sizes)
        ax.set_title(f"norm = {row}", fontsize=10)
        ax.legend(fontsize=8, loc="best")
    axes[0].set_ylabel("val Dice")  # eval_modes are always validation Dice, whatever --metric is
    note = ERRORBAR_NOTE + ("; n=1 points have none" if any_single else "")
    fig.suptitle(f"BatchNorm family: same weights, different evaluation statistics ({note})", fontsize=10)
    return _save(fig, path)
