"""Markdown tables and CSV files from a Summary."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from norm_experiments.report.cells import Analysis, BestNorm, Cell, Comparison, Summary, mode_label
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


def format_interval(interval: Interval, n_expected: int, notes: Sequence[str] = (), digits: int = 3) -> str:
    """'0.712 ± 0.031'; n=1 has no ±; fewer seeds than expected shows n; notes go in brackets."""
    m, s = f"{interval.mean:.{digits}f}", f"{interval.std:.{digits}f}"
    text = f"{m} ± {s}" if interval.has_spread else m
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
    """'group; ties: instance' (the rows the paired tests cannot tell apart from the leader, after Holm);
    'group; ahead of all' when every other row is significantly worse; untestable rows are listed."""
    if best is None:
        return NO_DATA
    if not best.comparisons:
        return f"{best.leader} (only norm)"
    untested = [c.against for c in best.comparisons if c.test is None]
    tied = [row for row in best.tied if row not in untested]
    parts = [best.leader]
    if tied:
        parts.append(f"ties: {', '.join(tied)}")
    elif len(untested) < len(best.comparisons):
        parts.append("ahead of all" if not untested else "ahead of the tested")
    if untested:
        parts.append(f"untested: {', '.join(untested)}")
    return "; ".join(parts)


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
                found.append((mode_label(row, mode), row, mode))
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


def _seeds(seeds: Sequence[int]) -> str:
    return ", ".join(map(str, seeds))


# ---------------------------------------------------------------- markdown tables


def metric_table(summary: Summary) -> str:
    """Rows = norms (+ eval-mode rows), columns = batch sizes, cells = mean ± std (with a dagger where a
    seed was still improving), last row = the best norm and the norms tied with it."""
    rows = []
    for label, row, mode in _ordered_rows(summary):
        cells = [summary.cell(row, bs) for bs in summary.batch_sizes]
        if mode is None:
            rows.append([label] + [format_metric_cell(c) + _dagger(c) for c in cells])
        else:
            rows.append([label] + [format_mode_cell(c, mode) for c in cells])
    rows.append(["**best (ties)**"] + [best_verdict(summary.best.get(bs)) for bs in summary.batch_sizes])
    return markdown_table(_header(summary, "norm"), rows)


def _dagger(cell: Cell | None) -> str:
    return " †" if cell is not None and cell.under_trained else ""


def hd95_table(summary: Summary) -> str:
    """HD95 in mm (mean ± std over seeds), final evaluation and each BatchNorm evaluation mode."""
    rows = []
    for label, row, mode in _ordered_rows(summary):
        cells = [summary.cell(row, bs) for bs in summary.batch_sizes]
        if mode is None:
            found = [c.hd95 if c else None for c in cells]
        else:
            found = [c.eval_modes_hd95.get(mode) if c else None for c in cells]
        rows.append(
            [label] + [NO_DATA if iv is None else format_interval(iv, iv.n, digits=1) for iv in found]
        )
    return markdown_table(_header(summary, "norm"), rows)


def format_difference(comparison: Comparison | None) -> str:
    """'+0.012 [-0.030, +0.054]', with ' *' where the Holm-adjusted p < 0.05; '(n=1)' without a test."""
    if comparison is None:
        return NO_DATA
    diff = comparison.a_mean - comparison.b_mean
    if comparison.test is None:
        return f"{diff:+.3f} (n<2, untested)"
    t = comparison.test
    star = " *" if comparison.significant else ""
    return f"{t.mean_diff:+.3f} [{t.ci_low:+.3f}, {t.ci_high:+.3f}]{star}"


def delta_table(summary: Summary) -> str:
    """Each row (and BN evaluation mode) minus the reference norm at the same batch size and seed."""
    labels = [label for label, row, mode in _ordered_rows(summary) if mode != "running"]
    labels = [label for label in labels if label != summary.reference]
    rows = [
        [label] + [format_difference(summary.delta(label, bs)) for bs in summary.batch_sizes]
        for label in labels
    ]
    return markdown_table(_header(summary, f"minus {summary.reference}"), rows)


def best_table(summary: Summary) -> str:
    """Per batch size: the leader, and its paired test against every other norm (Holm within the size)."""
    header = ["batch size", "best", "mean", "vs", "mean", "difference [95% CI]", "p", "p (Holm)", "verdict"]
    rows = []
    for bs in summary.batch_sizes:
        best = summary.best.get(bs)
        if best is None:
            rows.append([str(bs), NO_DATA] + [""] * 7)
            continue
        if not best.comparisons:
            rows.append([str(bs), best.leader, f"{best.leader_mean:.3f}", "", "", "", "", "", "only norm"])
        for c in best.comparisons:
            if c.test is None:
                p, adjusted, verdict = "", "", "untested (fewer than 2 paired seeds)"
            else:
                p, adjusted = format_p(c.test.p_value), format_p(c.p_holm)  # type: ignore[arg-type]
                verdict = "leader better" if c.significant else "tie: not distinguishable"
            rows.append(
                [str(bs), best.leader, f"{c.a_mean:.3f}", c.against, f"{c.b_mean:.3f}", format_difference(c)]
                + [p, adjusted, verdict]
            )
    return markdown_table(header, rows, align="rlrlrrrrl")


def gap_table(analysis: Analysis) -> str:
    """BatchNorm's evaluation-mode gaps: batch statistics and PreciseBN minus running statistics."""
    header = [
        "condition",
        "norm",
        "batch size",
        "compared",
        "mean",
        "running",
        "difference [95% CI]",
        "p (Holm)",
        "significant",
    ]
    rows = []
    for gap in analysis.gaps:
        c = gap.comparison
        verdict = "untested" if c.significant is None else ("yes" if c.significant else "no")
        p = "" if c.p_holm is None else format_p(c.p_holm)
        norm = c.label.split(" (")[0]
        mode = c.label[len(norm) + 2 : -1]
        rows.append(
            [gap.condition or "all", norm, str(c.batch_size), mode, f"{c.a_mean:.3f}", f"{c.b_mean:.3f}"]
            + [format_difference(c), p, verdict]
        )
    return markdown_table(header, rows, align="llrlrrrrl")


def convergence_table(summary: Summary) -> str:
    """Per cell: how many seeds were still improving at the end of training."""
    rows = []
    for row in summary.rows:
        cells = [summary.cell(row, bs) for bs in summary.batch_sizes]
        rows.append(
            [row]
            + [
                NO_DATA if c is None or not c.with_flag else f"{c.still_improving}/{c.with_flag}"
                for c in cells
            ]
        )
    return markdown_table(_header(summary, "still improving"), rows)


def ci_table(summary: Summary) -> str:
    """The 95% t-intervals of the same cells."""
    rows = []
    for label, row, mode in _ordered_rows(summary):
        cells = [summary.cell(row, bs) for bs in summary.batch_sizes]
        rows.append([label] + [format_ci(c.interval(mode) if c else None) for c in cells])
    return markdown_table(_header(summary, "norm"), rows)


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


def _test_columns(prefix: str, comparison: Comparison | None) -> dict[str, str]:
    test = comparison.test if comparison else None
    if test is None:
        return {f"{prefix}_{k}": "" for k in ("mean", "ci95_low", "ci95_high", "p", "p_holm")}
    return {
        f"{prefix}_mean": _num(test.mean_diff),
        f"{prefix}_ci95_low": _num(test.ci_low),
        f"{prefix}_ci95_high": _num(test.ci_high),
        f"{prefix}_p": _num(test.p_value),
        f"{prefix}_p_holm": _num(comparison.p_holm),  # type: ignore[union-attr]
    }


def results_rows(analysis: Analysis) -> list[dict[str, str]]:
    """One row per (condition, norm, batch size) cell."""
    rows = []
    for summary in analysis.conditions:
        for row in summary.rows:
            for bs in summary.batch_sizes:
                cell = summary.cell(row, bs)
                if cell is not None:
                    rows.append(_results_row(summary, cell))
    return rows


def _results_row(summary: Summary, cell: Cell) -> dict[str, str]:
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
        "seeds_completed": " ".join(str(s) for s in sorted(cell.by_seed)),
    }
    line.update(_interval_columns(summary.metric, cell.metric))
    line.update(_interval_columns("val_hd95", cell.hd95))
    for mode in summary.eval_modes:
        line.update(_interval_columns(f"eval_{mode}", cell.eval_modes.get(mode)))
    line.update(_test_columns(f"minus_{summary.reference}", summary.delta(cell.row, cell.batch_size)))
    line["n_still_improving"] = str(cell.still_improving)
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
