"""results.csv (one row per cell) and runs.csv (one row per run, every metrics.json field flattened)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from norm_experiments.report.analysis import Analysis, Summary
from norm_experiments.report.cells import Cell, mode_label
from norm_experiments.report.collect import Run
from norm_experiments.report.stats import Interval
from norm_experiments.report.verdicts import Comparison

# Leading columns of runs.csv; any other field found in metrics.json follows in alphabetical order.
RUN_COLUMNS = (
    "run_name",
    "run_id",
    "status",
    "error",
    "norm",
    "model",
    "seed",
    "batch_size",
    "patches_per_volume",
    "effective_batch",
    "val_dice",
    "best_val_dice",
)


def _num(value: float | None, digits: int = 6) -> str:
    return "" if value is None else f"{value:.{digits}g}"


def _interval_columns(prefix: str, interval: Interval | None) -> dict[str, str]:
    if interval is None:
        return {f"{prefix}_{k}": "" for k in ("n", "mean", "std", "ci95_low", "ci95_high", "ci95_method")}
    return {
        f"{prefix}_n": str(interval.n),
        f"{prefix}_mean": _num(interval.mean),
        f"{prefix}_std": _num(interval.std),
        f"{prefix}_ci95_low": _num(interval.low),
        f"{prefix}_ci95_high": _num(interval.high),
        f"{prefix}_ci95_method": interval.method,
    }


def _test_columns(prefix: str, comparison: Comparison | None) -> dict[str, str]:
    """The difference, its family-adjusted interval, Bonferroni p, verdict and method."""
    keys = ("mean", "low", "high", "p", "p_bonferroni", "verdict", "method", "n_seeds", "n_cases")
    if comparison is None:
        return {f"{prefix}_{k}": "" for k in keys}
    estimate = comparison.estimate
    return {
        f"{prefix}_mean": _num(comparison.difference),
        f"{prefix}_low": _num(comparison.low),
        f"{prefix}_high": _num(comparison.high),
        f"{prefix}_p": "" if estimate is None else _num(estimate.p_value),
        f"{prefix}_p_bonferroni": _num(comparison.p_adjusted),
        f"{prefix}_verdict": comparison.verdict.value,
        f"{prefix}_method": "" if estimate is None else estimate.method,
        f"{prefix}_n_seeds": str(comparison.n_seeds),
        f"{prefix}_n_cases": "" if estimate is None else str(estimate.n_cases),
    }


def results_rows(analysis: Analysis) -> list[dict[str, str]]:
    """One row per (condition, norm, batch size) cell."""
    rows = []
    for summary in analysis.conditions:
        for row in summary.rows:
            for bs in summary.batch_sizes:
                cell = summary.cell(row, bs)
                if cell is not None:
                    rows.append(_results_row(summary, cell, analysis.reference))
    return rows


def _results_row(summary: Summary, cell: Cell, reference: str) -> dict[str, str]:
    """`reference`: the analysis's reference norm, which names the difference columns also in a condition
    without its runs (their cells are then empty; the columns were named minus_None)."""
    counts = cell.status_counts
    line = {
        "condition": summary.condition,
        "norm": cell.row,
        "batch_size": str(cell.batch_size),
        "n_seeds_expected": str(cell.n_expected),
        "n_seeds_completed": str(cell.n_completed),
        "n_failed": str(cell.n_failed),
        "n_running": str(counts["running"]),
        "n_interrupted": str(counts["interrupted"]),
        "n_stopped": str(counts["stopped"]),  # its record says running, its process has ended
        "seeds_completed": " ".join(str(s) for s in sorted(cell.by_seed)),
    }
    line.update(_interval_columns(summary.metric, cell.metric))
    line.update(_interval_columns("val_hd95", cell.hd95))
    for mode in summary.eval_modes:
        line.update(_interval_columns(f"eval_{mode}", cell.eval_modes.get(mode)))
    line.update(_test_columns(f"minus_{reference}", summary.delta(cell.row, cell.batch_size)))
    for mode in ("batch", "precise"):
        gap = next(
            (
                c
                for c in summary.gaps.comparisons
                if c.label == mode_label(cell.row, mode) and c.batch_size == cell.batch_size
            ),
            None,
        )
        if gap is not None:
            line.update(_test_columns(f"gap_{mode}_minus_running", gap))
    line["n_still_improving"] = str(cell.still_improving)
    line["n_convergence_flags"] = str(cell.with_flag)
    line["convergence_metric"] = " ".join(cell.flag_metrics)
    line["mean_samples_per_s"] = _num(cell.samples_per_s)
    line["mean_peak_memory_mb"] = _num(cell.peak_memory_mb)
    line["mean_peak_cuda_memory_mb"] = _num(cell.peak_cuda_memory_mb)
    line["status"] = cell.status_summary
    return line


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'eval_modes': {'batch': 0.8}} -> {'eval_modes.batch': 0.8}."""
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        elif isinstance(value, list):
            # Per-step histories (lists of dicts) belong in TensorBoard, not in a spreadsheet cell.
            if not any(isinstance(v, dict | list) for v in value):
                flat[name] = " ".join(str(v) for v in value)
        else:
            flat[name] = "" if value is None else value
    return flat


def runs_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per run with every metrics.json field flattened, plus the file it came from."""
    rows = []
    for run in runs:
        flat = _flatten(run.data)
        flat["path"] = str(run.path)
        rows.append(flat)
    return rows


def write_csv(path: Path, rows: Sequence[dict[str, Any]], leading: Sequence[str] = ()) -> None:
    """Write dict rows; columns are `leading` (those present) then every other key in order of appearance."""
    present = {k for row in rows for k in row}
    columns = [c for c in leading if c in present]
    for row in rows:
        columns += [k for k in row if k not in columns]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def write_results_csv(analysis: Analysis, path: Path) -> None:
    write_csv(path, results_rows(analysis))


def write_runs_csv(runs: Sequence[Run], path: Path) -> None:
    write_csv(path, runs_rows(runs), leading=RUN_COLUMNS + ("path",))
