"""learning_curves.png: training loss and validation Dice over patches seen, per norm and batch size, as the
mean over seeds with a band from the lowest to the highest seed.

The points come from each completed run's record: `loss_history` (the mean training loss of each logging
window at its optimizer step; patches seen = step x `global_batch`) and `history` (each validation during
training: patches seen and Dice in eval mode). A record is untrusted input (docs/safety.md): read_curves
accepts only lists of at most MAX_POINTS entries, each an object with an integer position >= 0 and a finite
value (null or NaN: no value, as training writes it where a loss or a Dice is undefined), positions strictly
increasing. Anything else raises CurveError naming the field; the report then leaves that run's curves out
and says so in its notes, never more.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from norm_experiments.report.analysis import Analysis, Summary
from norm_experiments.report.cells import Cell
from norm_experiments.report.collect import Run
from norm_experiments.report.plots import norm_colors

FILENAME = "learning_curves.png"
MAX_POINTS = 100_000  # entries of one history list: far above a run's (log_every_steps 10: 1e6 steps)
GRID_POINTS = 200  # points of one drawn mean line (the band is interpolated onto them)
LINESTYLES = ("-", "--", ":", "-.")  # rows of one norm (e.g. "batch [accumulate 4]") share its colour

Points = tuple[list[float], list[float]]  # (patches seen, value), patches strictly increasing


class CurveError(ValueError):
    """A record's history that the report cannot draw (the message names the field)."""


@dataclass(frozen=True)
class Curves:
    """One run's learning curves; either list may be empty (a run that logged no loss or validated never)."""

    loss: Points
    dice: Points


@dataclass(frozen=True)
class Band:
    """Curves of several seeds on one grid of patches: the mean and the lowest and highest seed at each x,
    over the seeds whose curve covers that x."""

    x: list[float]
    mean: list[float]
    low: list[float]
    high: list[float]
    seeds: int  # curves that went into it


@dataclass
class CellCurves:
    cell: Cell
    loss: Band | None
    dice: Band | None


@dataclass
class LearningCurves:
    """What plot_learning_curves drew: its file (None: no run has curves) and a note per left-out run."""

    path: Path | None
    notes: list[tuple[Summary, str]] = field(default_factory=list)


def _integer(value: Any, where: str) -> int:
    integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral or not 0 <= value <= 1e15:
        raise CurveError(f"{where} is {value!r:.40}, not an integer >= 0")
    return int(value)


def _value(value: Any, where: str, low: float = -math.inf, high: float = math.inf) -> float | None:
    """A finite number in [low, high]; None for null or NaN (no value)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CurveError(f"{where} is {value!r:.40}, not a number")
    if math.isnan(value):
        return None
    if not (math.isfinite(value) and low <= value <= high):
        raise CurveError(f"{where} = {value!r:.40} is outside [{low:g}, {high:g}]")
    return float(value)


def _entries(data: dict, key: str) -> list[dict]:
    entries = data.get(key)
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise CurveError(f"{key} is not a list")
    if len(entries) > MAX_POINTS:
        raise CurveError(f"{key} has {len(entries)} entries, more than {MAX_POINTS}")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise CurveError(f"{key}[{i}] is not an object")
    return entries


def _points(pairs: list[tuple[int, float | None]], key: str) -> Points:
    """Drop the points without a value; positions must increase strictly."""
    for i in range(1, len(pairs)):
        if pairs[i][0] <= pairs[i - 1][0]:
            raise CurveError(f"{key}[{i}] does not come after {key}[{i - 1}] (patches seen must increase)")
    kept = [(float(x), y) for x, y in pairs if y is not None]
    return [x for x, _ in kept], [y for _, y in kept]


def patches_per_step(data: dict) -> int | None:
    """Training patches per optimizer step: `global_batch`, else samples_seen / steps when that divides."""
    value = data.get("global_batch")
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1e15:
        return value
    seen, steps = data.get("samples_seen"), data.get("steps")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in (seen, steps)) and steps > 0:
        if seen % steps == 0 and seen > 0:
            return seen // steps
    return None


def read_curves(run: Run) -> Curves | None:
    """The run's learning curves from its record; None when it has neither history (older records).
    Raises CurveError when a history breaks the rules of the module docstring."""
    data = run.data
    if data.get("loss_history") is None and data.get("history") is None:
        return None
    losses = _entries(data, "loss_history")
    validations = _entries(data, "history")
    per_step = patches_per_step(data)
    if losses and per_step is None:
        raise CurveError("neither global_batch nor samples_seen / steps gives the patches per step")
    loss = _points(
        [
            (
                _integer(e.get("step"), f"loss_history[{i}].step") * per_step,  # type: ignore[operator]
                _value(e.get("loss"), f"loss_history[{i}].loss"),
            )
            for i, e in enumerate(losses)
        ],
        "loss_history",
    )
    dice_pairs = []
    for i, e in enumerate(validations):
        if "samples_seen" in e or per_step is None:
            x = _integer(e.get("samples_seen"), f"history[{i}].samples_seen")
        else:
            x = _integer(e.get("step"), f"history[{i}].step") * per_step
        dice_pairs.append((x, _value(e.get("val_dice"), f"history[{i}].val_dice", 0.0, 1.0)))
    return Curves(loss=loss, dice=_points(dice_pairs, "history"))


def band(curves: Sequence[Points]) -> Band | None:
    """Mean, lowest and highest of the curves at each x of a common grid (the union of their x, or
    GRID_POINTS evenly spaced ones when there are more); each curve is interpolated linearly within its own
    range and counts nowhere else. None when no curve has a point."""
    curves = [(np.asarray(x, dtype=float), np.asarray(y, dtype=float)) for x, y in curves if x]
    if not curves:
        return None
    xs = np.unique(np.concatenate([x for x, _ in curves]))
    grid = xs if len(xs) <= GRID_POINTS else np.linspace(xs[0], xs[-1], GRID_POINTS)
    values = np.full((len(curves), len(grid)), np.nan)
    for row, (x, y) in enumerate(curves):
        inside = (grid >= x[0]) & (grid <= x[-1])
        values[row, inside] = np.interp(grid[inside], x, y)
    covered = ~np.isnan(values)
    keep = covered.any(axis=0)
    grid, values, covered = grid[keep], values[:, keep], covered[:, keep]
    total = np.where(covered, values, 0.0).sum(axis=0)
    mean = total / covered.sum(axis=0)
    low = np.where(covered, values, np.inf).min(axis=0)
    high = np.where(covered, values, -np.inf).max(axis=0)
    return Band(grid.tolist(), mean.tolist(), low.tolist(), high.tolist(), len(curves))


def _where(summary: Summary) -> str:
    return f"{summary.condition}: " if summary.condition else ""


def cell_curves(summary: Summary, cell: Cell, notes: list[tuple[Summary, str]]) -> CellCurves:
    """The bands of the cell's completed runs; a run whose record cannot be drawn adds a note."""
    losses, dices = [], []
    for run in cell.runs:
        if not run.completed:
            continue
        try:
            found = read_curves(run)
        except CurveError as err:
            notes.append(
                (
                    summary,
                    f"{_where(summary)}learning curves of {run.name} ({run.path.parent}) left out of "
                    f"{FILENAME}: {err}",
                )
            )
            continue
        if found is not None:
            losses.append(found.loss)
            dices.append(found.dice)
    return CellCurves(cell, band(losses), band(dices))


def learning_curves(analysis: Analysis) -> tuple[list[tuple[Summary, list[CellCurves]]], list]:
    """Per condition with any curve: the cells' bands; and the notes (summary, text) of left-out runs."""
    notes: list[tuple[Summary, str]] = []
    found = []
    for summary in analysis.conditions:
        cells = [
            cell_curves(summary, cell, notes)
            for cell in sorted(summary.cells.values(), key=lambda c: (c.batch_size, c.row))
        ]
        cells = [c for c in cells if c.loss is not None or c.dice is not None]
        if cells:
            found.append((summary, cells))
        without = [r for c in summary.cells.values() for r in c.runs if r.completed and _lacks_curves(r)]
        if cells and without:
            notes.append(
                (
                    summary,
                    f"{_where(summary)}{len(without)} completed run(s) record no learning curve (no "
                    f"loss_history or history): not in {FILENAME}",
                )
            )
    return found, notes


def _lacks_curves(run: Run) -> bool:
    return not run.data.get("loss_history") and not run.data.get("history")


def _literal(text: str) -> str:
    """Text from a record as matplotlib shows it literally: a '$' would start mathtext (and a malformed
    formula would fail the whole figure)."""
    return text.replace("$", r"\$")


def _draw_loss(ax: Axes, found: Band | None, color: str, style: str, width: float) -> None:
    if found is not None:
        ax.fill_between(found.x, found.low, found.high, color=color, alpha=0.18, linewidth=0)
        ax.plot(found.x, found.mean, color=color, linestyle=style, linewidth=width)


def _draw_dice(ax: Axes, found: Band | None, color: str, style: str, width: float) -> None:
    """Validations are few points: the seeds' range as an error bar at each."""
    if found is not None:
        error = [
            [m - lo for m, lo in zip(found.mean, found.low)],
            [hi - m for m, hi in zip(found.mean, found.high)],
        ]
        ax.errorbar(
            found.x, found.mean, yerr=error, color=color, linestyle=style, linewidth=width, marker="o",
            markersize=4, capsize=2, elinewidth=1.2,
        )  # fmt: skip


def _right_end(*bands: Band | None) -> float:
    return max((b.x[-1] for b in bands if b is not None and b.x), default=1.0)


def plot_learning_curves(analysis: Analysis, path: Path) -> LearningCurves:
    """Two panel rows per condition (training loss, validation Dice), a column per batch size; one line per
    row of the tables in its norm's colour (plots.norm_colors). Writes nothing (path None) when no completed
    run has curves."""
    found, notes = learning_curves(analysis)
    if not found:
        return LearningCurves(None, notes)
    colors = norm_colors(analysis)
    columns = max(len({c.cell.batch_size for c in cells}) for _, cells in found)
    fig = Figure(figsize=(3.6 * columns + 1.0, 2.9 * 2 * len(found) + 0.8), layout="constrained")
    axes = fig.subplots(2 * len(found), columns, squeeze=False, sharey="row")
    # Every row's colour (its norm's) and line style (rows of one norm differ), in the tables' order.
    styles: dict[str, tuple[str, str]] = {}
    rows_of: dict[str, int] = {}
    for norm, row in sorted({(c.cell.norm, c.cell.row) for _, cells in found for c in cells}):
        if row not in styles:
            styles[row] = (colors.get(norm, "black"), LINESTYLES[rows_of.get(norm, 0) % len(LINESTYLES)])
            rows_of[norm] = rows_of.get(norm, 0) + 1
    order = list(styles)
    for index, (summary, cells) in enumerate(found):
        sizes = sorted({c.cell.batch_size for c in cells})
        loss_axes, dice_axes = axes[2 * index], axes[2 * index + 1]
        for column, bs in enumerate(sizes):
            right = 1.0
            drawn = sorted(
                (c for c in cells if c.cell.batch_size == bs), key=lambda c: order.index(c.cell.row)
            )
            for item in drawn:
                row = item.cell.row
                color, style = styles[row]
                # Rows whose curves coincide (BatchNorm at batch 1 trains as InstanceNorm does) stay visible:
                # each row drawn later is thinner than the one under it.
                width = max(2.8 - 0.6 * order.index(row), 0.8)
                _draw_loss(loss_axes[column], item.loss, color, style, width)
                _draw_dice(dice_axes[column], item.dice, color, style, width)
                right = max(right, _right_end(item.loss, item.dice))
            title = _literal(f"{_where(summary)}bs {bs}")
            loss_axes[column].set_title(title, fontsize=9)
            dice_axes[column].set_title(title, fontsize=9)
            dice_axes[column].set_xlabel("patches seen")
            for ax in (loss_axes[column], dice_axes[column]):
                ax.grid(True, alpha=0.3)
                ax.set_xlim(0, right * 1.03)
                ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
        for column in range(len(sizes), columns):
            loss_axes[column].set_visible(False)
            dice_axes[column].set_visible(False)
        loss_axes[0].set_ylabel("training loss\n(logging-window mean)")
        dice_axes[0].set_ylabel("validation Dice\n(eval mode)")
    handles = [Line2D([], [], color=c, linestyle=s, linewidth=1.8) for c, s in styles.values()]
    labels = [_literal(row) for row in styles]
    fig.legend(
        handles, labels, title="norm", loc="outside lower center", ncols=min(len(labels), 4), fontsize=8
    )
    fig.suptitle(
        "Learning curves of the completed runs: mean over seeds (line), lowest to highest seed (band, bars)",
        fontsize=10,
    )
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return LearningCurves(path, notes)
