"""Markdown tables and CSV files from a Summary."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from norm_experiments.report.cells import EVAL_MODE_LABELS, BestNorm, Cell, Summary
from norm_experiments.report.collect import Run
from norm_experiments.report.stats import Interval

NO_DATA = "—"

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


# ---------------------------------------------------------------- formatting helpers


def _escape(text: str) -> str:
    # A pipe or a newline inside a cell would break the markdown table.
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A GitHub-flavoured markdown table. align: one 'l' or 'r' per column (default: 'l' then all 'r')."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = [
        "| " + " | ".join(_escape(h) for h in header) + " |",
        "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|",
    ]
    lines += ["| " + " | ".join(_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def format_p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.2g}"


def format_interval(interval: Interval, n_expected: int, notes: Sequence[str] = ()) -> str:
    """'0.712 ± 0.031'; n=1 has no ±; fewer seeds than expected shows n; notes go in brackets."""
    text = f"{interval.mean:.3f} ± {interval.std:.3f}" if interval.has_spread else f"{interval.mean:.3f}"
    extra = list(notes)
    if interval.n < n_expected:
        extra.insert(0, f"n={interval.n}/{n_expected}")
    elif interval.n == 1:
        extra.insert(0, "n=1")
    return f"{text} ({'; '.join(extra)})" if extra else text


def _unfinished(cell: Cell) -> list[tuple[str, int]]:
    """(status, count) for every run of the cell without a result, plus seeds with no run at all."""
    counts = cell.status_counts
    found = [(status, n) for status, n in counts.items() if status != "completed"]
    if cell.n_missing:
        found.append(("missing", cell.n_missing))
    return found


def format_metric_cell(cell: Cell | None) -> str:
    if cell is None:
        return NO_DATA
    unfinished = _unfinished(cell)
    if cell.metric is None:
        return ", ".join(f"{status} ({n}/{cell.n_expected})" for status, n in unfinished)
    notes = [f"{n} {status}" for status, n in unfinished if status != "missing"]
    return format_interval(cell.metric, cell.n_expected, notes)


def format_mode_cell(cell: Cell | None, mode: str) -> str:
    if cell is None or mode not in cell.eval_modes:
        return NO_DATA
    return format_interval(cell.eval_modes[mode], cell.n_expected)


def format_ci(interval: Interval | None) -> str:
    if interval is None:
        return NO_DATA
    if not interval.has_spread:
        return f"{interval.mean:.3f} (n=1, no interval)"
    return f"[{interval.low:.3f}, {interval.high:.3f}]"


def best_verdict(best: BestNorm | None) -> str:
    """'group: yes (p=0.01)', 'group: within noise (p=0.4)', 'group: n/a' (fewer than 2 paired seeds)."""
    if best is None:
        return NO_DATA
    if best.runner_up is None:
        return f"{best.leader}: only norm"
    if best.test is None:
        return f"{best.leader}: n/a"
    word = "yes" if best.significant else "within noise"
    return f"{best.leader}: {word} ({format_p(best.test.p_value)})"


def mode_rows(summary: Summary) -> list[tuple[str, str, str]]:
    """(label, row, mode) for the extra eval-mode rows of BN-family norms.

    With the default metric (val_dice, evaluated with running statistics) a 'running' row would repeat the
    norm's own row, so it is left out.
    """
    modes = [m for m in summary.eval_modes if not (m == "running" and summary.metric == "val_dice")]
    found = []
    for row in summary.bn_rows:
        for mode in modes:
            if any(mode in c.eval_modes for c in summary.cells.values() if c.row == row):
                found.append((f"{row} ({EVAL_MODE_LABELS.get(mode, mode)})", row, mode))
    return found


def _ordered_rows(summary: Summary) -> list[tuple[str, str, str | None]]:
    """(label, row, mode) in display order: each norm, then its eval-mode rows directly below it."""
    extra = mode_rows(summary)
    ordered = []
    for row in summary.rows:
        ordered.append((row, row, None))
        ordered += [item for item in extra if item[1] == row]
    return ordered


def _header(summary: Summary, first: str) -> list[str]:
    return [first] + [f"bs {bs}" for bs in summary.batch_sizes]


# ---------------------------------------------------------------- markdown tables


def metric_table(summary: Summary) -> str:
    """Rows = norms (+ eval-mode rows), columns = batch sizes, cells = mean ± std, last row = best norm."""
    rows = []
    for label, row, mode in _ordered_rows(summary):
        cells = [summary.cell(row, bs) for bs in summary.batch_sizes]
        if mode is None:
            rows.append([label] + [format_metric_cell(c) for c in cells])
        else:
            rows.append([label] + [format_mode_cell(c, mode) for c in cells])
    rows.append(["**best norm**"] + [best_verdict(summary.best.get(bs)) for bs in summary.batch_sizes])
    return markdown_table(_header(summary, "norm"), rows)


def ci_table(summary: Summary) -> str:
    """The 95% t-intervals of the same cells."""
    rows = []
    for label, row, mode in _ordered_rows(summary):
        cells = [summary.cell(row, bs) for bs in summary.batch_sizes]
        if mode is None:
            rows.append([label] + [format_ci(c.metric if c else None) for c in cells])
        else:
            rows.append([label] + [format_ci(c.eval_modes.get(mode) if c else None) for c in cells])
    return markdown_table(_header(summary, "norm"), rows)


def best_table(summary: Summary) -> str:
    """Per batch size: the leader, the runner-up and the paired t-test between them."""
    header = [
        "batch size",
        "best",
        "mean",
        "runner-up",
        "mean",
        "lead",
        "paired seeds",
        "p",
        "beyond seed noise",
    ]
    rows = []
    for bs in summary.batch_sizes:
        best = summary.best.get(bs)
        if best is None:
            rows.append([str(bs), NO_DATA] + [""] * 7)
            continue
        test = best.test
        lead = "" if best.runner_up_mean is None else f"{best.leader_mean - best.runner_up_mean:.3f}"
        if test is None:
            verdict, p, pairs = ("n/a (fewer than 2 paired seeds)" if best.runner_up else "only norm"), "", ""
        else:
            verdict = "yes" if best.significant else "no, within noise"
            p, pairs = format_p(test.p_value), str(test.n_pairs)
        rows.append(
            [
                str(bs),
                best.leader,
                f"{best.leader_mean:.3f}",
                best.runner_up or "",
                "" if best.runner_up_mean is None else f"{best.runner_up_mean:.3f}",
                lead,
                pairs,
                p,
                verdict,
            ]
        )
    return markdown_table(header, rows, align="rlrlrrrrl")


def uses_cuda_memory(summary: Summary) -> bool:
    return any(c.peak_cuda_memory_mb is not None for c in summary.cells.values())


def _cost_cell(cell: Cell | None, cuda: bool) -> str:
    if cell is None or cell.metric is None:
        return NO_DATA
    memory = cell.peak_cuda_memory_mb if cuda else cell.peak_memory_mb
    speed = NO_DATA if cell.samples_per_s is None else f"{cell.samples_per_s:.1f}/s"
    mem = NO_DATA if memory is None else f"{memory:.0f} MB"
    return f"{speed}, {mem}"


def cost_table(summary: Summary) -> str:
    """Mean samples/s and mean peak memory (CUDA if recorded, else host) over completed seeds."""
    cuda = uses_cuda_memory(summary)
    rows = [
        [row] + [_cost_cell(summary.cell(row, bs), cuda) for bs in summary.batch_sizes]
        for row in summary.rows
    ]
    return markdown_table(_header(summary, "norm"), rows)


# ---------------------------------------------------------------- CSV files


def _num(value: float | None, digits: int = 6) -> str:
    return "" if value is None else f"{value:.{digits}g}"


def _interval_columns(prefix: str, interval: Interval | None) -> dict[str, str]:
    if interval is None:
        return {f"{prefix}_{k}": "" for k in ("n", "mean", "std", "ci95_low", "ci95_high")}
    return {
        f"{prefix}_n": str(interval.n),
        f"{prefix}_mean": _num(interval.mean),
        f"{prefix}_std": _num(interval.std),
        f"{prefix}_ci95_low": _num(interval.low),
        f"{prefix}_ci95_high": _num(interval.high),
    }


def results_rows(summary: Summary) -> list[dict[str, str]]:
    """One row per (norm, batch size) cell."""
    rows = []
    for row in summary.rows:
        for bs in summary.batch_sizes:
            cell = summary.cell(row, bs)
            if cell is None:
                continue
            counts = cell.status_counts
            line = {
                "norm": row,
                "batch_size": str(bs),
                "n_seeds_expected": str(cell.n_expected),
                "n_seeds_completed": str(cell.n_completed),
                "n_failed": str(cell.n_failed),
                "n_running": str(counts["running"]),
                "n_interrupted": str(counts["interrupted"]),
                "seeds_completed": " ".join(str(s) for s in sorted(cell.by_seed)),
            }
            line.update(_interval_columns(summary.metric, cell.metric))
            for mode in summary.eval_modes:
                line.update(_interval_columns(f"eval_{mode}", cell.eval_modes.get(mode)))
            line["mean_samples_per_s"] = _num(cell.samples_per_s)
            line["mean_peak_memory_mb"] = _num(cell.peak_memory_mb)
            line["mean_peak_cuda_memory_mb"] = _num(cell.peak_cuda_memory_mb)
            line["status"] = cell.status_summary
            rows.append(line)
    return rows


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


def write_results_csv(summary: Summary, path: Path) -> None:
    write_csv(path, results_rows(summary))


def write_runs_csv(runs: Sequence[Run], path: Path) -> None:
    write_csv(path, runs_rows(runs), leading=RUN_COLUMNS + ("path",))
