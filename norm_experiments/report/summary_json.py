"""summary.json: every run's per-case and per-class scores and every cell's means, in the shape of nnU-Net's
summary.json (`foreground_mean`, `mean` per class, `metric_per_case`), so that tools written for it read
ours with a loop over runs. The format is documented in docs/reference/run_folder.md.

Scores come from the records (metrics.json `per_case`, which collect.read_run has checked against
schema.py); a class absent from a case is null there and here (nnU-Net writes NaN; JSON has no NaN). The
class means are nnU-Net's: the mean over the cases that hold the class; `foreground_mean` is the mean of
those over the classes. A record without per-case scores gives its recorded per-class means instead
(val_dice_per_class, val_hd95_per_class), which training computes the same way, and an empty case list.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from norm_experiments.report.analysis import Analysis
from norm_experiments.report.cells import Cell, outcome
from norm_experiments.report.collect import Collection, Run

FILENAME = "summary.json"
FORMAT = "norm-experiments sweep summary, version 1"
MEASURES = {"dice": "Dice", "hd95": "HD95"}  # metrics.json per_case key -> nnU-Net's metric name
PRIMARY_MODE = "running"  # model.eval(): what val_dice is


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return math.fsum(present) / len(present) if present else None


def _classes(cases: dict) -> list[str]:
    """Every class named in any case and measure, in the order first met."""
    found: dict[str, None] = {}
    for measures in cases.values():
        for measure in MEASURES:
            by_class = measures.get(measure) if isinstance(measures, dict) else None
            for name in by_class if isinstance(by_class, dict) else ():
                found.setdefault(str(name), None)
    return list(found)


def _case_metrics(measures: Any, classes: list[str]) -> dict[str, dict[str, float | None]]:
    measures = measures if isinstance(measures, dict) else {}
    metrics: dict[str, dict[str, float | None]] = {name: {} for name in classes}
    for key, metric in MEASURES.items():
        by_class = measures.get(key)
        by_class = by_class if isinstance(by_class, dict) else {}
        for name in classes:
            metrics[name][metric] = _number(by_class.get(name))
    return metrics


def _means(per_class: dict[str, dict[str, float | None]]) -> dict[str, float | None]:
    return {metric: _mean(m.get(metric) for m in per_class.values()) for metric in MEASURES.values()}


def mode_scores(cases: dict) -> dict[str, Any]:
    """nnU-Net's three blocks for one evaluation mode's per-case scores ({case: {"dice": {class: v}, ...}})."""
    classes = _classes(cases)
    per_case = [
        {"case": str(case), "metrics": _case_metrics(measures, classes)}
        for case, measures in sorted(cases.items(), key=lambda item: str(item[0]))
    ]
    mean = {
        name: {
            metric: _mean(entry["metrics"][name][metric] for entry in per_case)
            for metric in MEASURES.values()
        }
        for name in classes
    }
    return {"foreground_mean": _means(mean), "mean": mean, "metric_per_case": per_case}


def _recorded(run: Run) -> dict[str, Any]:
    """The blocks from the record's own means, for a record without per-case scores."""
    dice, hd95 = run.data.get("val_dice_per_class"), run.data.get("val_hd95_per_class")
    dice, hd95 = (d if isinstance(d, dict) else {} for d in (dice, hd95))
    names = list(dict.fromkeys([*map(str, dice), *map(str, hd95)]))
    mean = {name: {"Dice": _number(dice.get(name)), "HD95": _number(hd95.get(name))} for name in names}
    foreground = {"Dice": run.value("val_dice"), "HD95": run.value("val_hd95")}
    return {"foreground_mean": foreground, "mean": mean, "metric_per_case": []}


def run_folder(run: Run, sweep_dirs: list[Path]) -> tuple[str, str]:
    """(the sweep dir the run was found under, the run folder relative to it, '/'-separated)."""
    folder = run.path.parent
    for sweep in sweep_dirs:
        if folder.is_relative_to(sweep):
            return str(sweep), folder.relative_to(sweep).as_posix()
    return "", folder.as_posix()


def run_entry(run: Run, condition: str, row: str, collection: Collection, metric: str) -> dict[str, Any]:
    sweep, folder = run_folder(run, collection.sweep_dirs)
    status, reason = outcome(run, metric)
    entry: dict[str, Any] = {
        "condition": condition,
        "norm": run.norm,
        "row": row,
        "batch_size": run.batch_size,
        "seed": run.seed,
        "status": status,
        "error": reason,
        "run_name": run.name,
        "sweep_dir": sweep,
        "run_folder": folder,
        metric: run.value(metric),
    }
    per_case = run.data.get("per_case")
    modes = {
        str(mode): cases
        for mode, cases in (per_case.items() if isinstance(per_case, dict) else ())
        if isinstance(cases, dict) and cases
    }
    if status != "completed":
        entry.update(foreground_mean={}, mean={}, metric_per_case=[], other_modes={})
        return entry
    primary = modes.pop(PRIMARY_MODE, None)
    entry.update(mode_scores(primary) if primary is not None else _recorded(run))
    entry["other_modes"] = {mode: mode_scores(cases) for mode, cases in sorted(modes.items())}
    return entry


def cell_entry(condition: str, cell: Cell, runs: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """Means over the cell's completed runs of their `foreground_mean` and per-class means."""
    done = [r for r in runs if r["status"] == "completed"]
    classes = list(dict.fromkeys(name for r in done for name in r["mean"]))
    return {
        "condition": condition,
        "norm": cell.norm,
        "row": cell.row,
        "batch_size": cell.batch_size,
        "seeds": sorted(r["seed"] for r in done),
        metric: cell.metric.mean if cell.metric is not None else None,
        "foreground_mean": {m: _mean(r["foreground_mean"].get(m) for r in done) for m in MEASURES.values()},
        "mean": {
            name: {m: _mean(r["mean"].get(name, {}).get(m) for r in done) for m in MEASURES.values()}
            for name in classes
        },
    }


def summary(analysis: Analysis, collection: Collection) -> dict[str, Any]:
    """The whole summary.json object: one entry per run of the report's cells, one per cell."""
    runs, cells = [], []
    for summary_ in analysis.conditions:
        for cell in sorted(summary_.cells.values(), key=lambda c: (c.row, c.batch_size)):
            entries = [
                run_entry(r, summary_.condition, cell.row, collection, analysis.metric)
                for r in sorted(cell.runs, key=lambda r: (r.seed, str(r.path)))
            ]
            runs += entries
            cells.append(cell_entry(summary_.condition, cell, entries, analysis.metric))
    return {
        "format": FORMAT,
        "metric": analysis.metric,
        "mode": PRIMARY_MODE,
        "sweep_dirs": [str(d) for d in collection.sweep_dirs],
        "cells": cells,
        "runs": runs,
    }


def write_summary_json(analysis: Analysis, collection: Collection, path: Path) -> Path:
    text = json.dumps(summary(analysis, collection), indent=1, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")
    return path
