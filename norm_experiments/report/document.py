"""report.md: the tables, the plots and a short plain-language reading generated from the numbers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from norm_experiments.report import tables
from norm_experiments.report.cells import STATUS_ORDER, BestNorm, Summary, outcome
from norm_experiments.report.collect import Collection

METRIC_DESCRIPTIONS = {
    "val_dice": "final validation mean foreground Dice in eval mode (running statistics for BatchNorm)",
    "best_val_dice": "best validation mean foreground Dice during training (eval mode)",
}
GAP_THRESHOLD = 0.02  # Dice differences below this are not worth a sentence about a train/eval mismatch


def _norm_name(row: str) -> str:
    return "BatchNorm" if row == "batch" else f"`{row}`"


def _main_bn_row(summary: Summary) -> str | None:
    if "batch" in summary.bn_rows:
        return "batch"
    return summary.bn_rows[0] if summary.bn_rows else None


def _gap_sentence(summary: Summary) -> str | None:
    """Running vs batch-statistics evaluation of BatchNorm at the smallest batch size that has both."""
    row = _main_bn_row(summary)
    for bs in summary.batch_sizes:
        cell = summary.cell(row, bs) if row else None
        if cell is None or not {"running", "batch"} <= set(cell.eval_modes):
            continue
        running, batch = cell.eval_modes["running"].mean, cell.eval_modes["batch"].mean
        precise = cell.eval_modes.get("precise")
        also = f" (recomputed precise-BN statistics: {precise.mean:.3f})" if precise else ""
        if batch - running > GAP_THRESHOLD:
            return (
                f"At batch size {bs}, {_norm_name(row)} evaluated with running statistics reaches "
                f"{running:.3f} while its batch-statistics evaluation reaches {batch:.3f}{also}: "
                "the gap is the train/eval mismatch, not a division by zero."
            )
        return (
            f"At batch size {bs}, {_norm_name(row)} scores {running:.3f} with running statistics and "
            f"{batch:.3f} with batch statistics{also}: no sizeable train/eval mismatch at this batch size."
        )
    return None


def _best_phrase(best: BestNorm) -> str:
    head = f"bs {best.batch_size}: {best.leader} ({best.leader_mean:.3f}"
    if best.runner_up is None:
        return head + ", the only norm with results)"
    lead = f"ahead of {best.runner_up} by {best.leader_mean - best.runner_up_mean:.3f}"
    if best.test is None:
        return head + f", {lead}; too few paired seeds to test)"
    p = tables.format_p(best.test.p_value)
    verdict = "beyond seed noise" if best.significant else "within seed noise"
    return head + f", {lead}, {verdict}, {p})"


def _best_sentence(summary: Summary) -> str | None:
    if not summary.best:
        return None
    return "Best norm per batch size: " + "; ".join(_best_phrase(b) for b in summary.best.values()) + "."


def _row_means(summary: Summary, row: str) -> dict[int, float]:
    cells = (summary.cell(row, bs) for bs in summary.batch_sizes)
    return {c.batch_size: c.metric.mean for c in cells if c is not None and c.metric is not None}


def _trend_sentence(summary: Summary) -> str | None:
    """How BatchNorm's score (running-statistics eval) changes from the smallest to the largest batch size."""
    row = _main_bn_row(summary)
    means = _row_means(summary, row) if row else {}
    if len(means) < 2:
        return None
    lo, hi = min(means), max(means)
    return (
        f"{_norm_name(row)}'s {summary.metric} goes from {means[lo]:.3f} at batch size {lo} "
        f"to {means[hi]:.3f} at batch size {hi}."
    )


def _steadiest_sentence(summary: Summary) -> str | None:
    """The norm whose mean varies least across batch sizes (among norms with results at every size)."""
    if len(summary.batch_sizes) < 2:
        return None
    spans = {}
    for row in summary.rows:
        means = _row_means(summary, row)
        if len(means) == len(summary.batch_sizes):
            spans[row] = (min(means.values()), max(means.values()))
    if not spans:
        return None
    row = min(spans, key=lambda r: spans[r][1] - spans[r][0])
    lo, hi = spans[row]
    return f"{_norm_name(row)} depends least on batch size: {lo:.3f} to {hi:.3f} across batch sizes."


def _failure_sentence(summary: Summary) -> str | None:
    if not summary.problems:
        return None
    counts = Counter(status for _, status, _ in summary.problems)
    detail = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return (
        f"{len(summary.problems)} run(s) have no result ({detail}); they count as missing in the tables "
        "and are listed below."
    )


def reading(summary: Summary) -> list[str]:
    """3-5 plain-language lines, each computed from the numbers in the summary."""
    lines = [
        _gap_sentence(summary),
        _best_sentence(summary),
        _trend_sentence(summary),
        _steadiest_sentence(summary),
        _failure_sentence(summary),
    ]
    found = [line for line in lines if line]
    return found or ["No run completed, so there is nothing to compare yet."]


def _run_counts(collection: Collection, metric: str) -> str:
    counts = Counter(outcome(r, metric)[0] for r in collection.runs)
    ordered = [s for s in STATUS_ORDER if counts.get(s)] + sorted(s for s in counts if s not in STATUS_ORDER)
    text = f"{len(collection.runs)} (" + ", ".join(f"{counts[s]} {s}" for s in ordered) + ")"
    if collection.unreadable:
        text += f"; {len(collection.unreadable)} unreadable metrics.json"
    return text


def _problems_section(summary: Summary) -> list[str]:
    if not summary.problems:
        return []
    rows = [
        [run.name, status, reason or "", str(run.path.parent)] for run, status, reason in summary.problems
    ]
    return [
        "## Runs without a result",
        "",
        tables.markdown_table(["run", "status", "error", "folder"], rows, align="llll"),
        "",
    ]


def _unreadable_section(collection: Collection) -> list[str]:
    if not collection.unreadable:
        return []
    lines = ["## Unreadable metrics.json", ""]
    lines += [f"- `{path}`: {why}" for path, why in collection.unreadable]
    return lines + [""]


def _notes_section(notes: list[str]) -> list[str]:
    if not notes:
        return []
    return ["## Notes", ""] + [f"- {note}" for note in notes] + [""]


def _batch_note(collection: Collection) -> str:
    note = "Batch size = volumes per optimizer step (`data.batch_size`)."
    if any(r.data.get("patches_per_volume", 1) not in (1, None) for r in collection.runs):
        note += " Some runs draw several patches per volume: BatchNorm then sees `effective_batch` patches."
    return note


def render_markdown(summary: Summary, collection: Collection, plots: dict[str, Path]) -> str:
    """The whole report.md. `plots` maps a caption to a PNG path next to report.md."""
    metric = summary.metric
    sweep_list = ", ".join(f"`{d}`" for d in collection.sweep_dirs)
    described = f", {METRIC_DESCRIPTIONS[metric]}" if metric in METRIC_DESCRIPTIONS else ""
    lines = [
        f"# Normalization vs batch size: {metric}",
        "",
        f"- Sweep dirs: {sweep_list}",
        f"- Runs: {_run_counts(collection, metric)}",
        f"- Metric: `{metric}`{described}",
        f"- {_batch_note(collection)}",
        "",
        "## Reading",
        "",
    ]
    lines += [f"- {line}" for line in reading(summary)]
    lines += [
        "",
        f"## {metric} by norm and batch size",
        "",
        "Mean ± sample std over seeds (3 decimals). `n=k/m`: only k of m seeds have a result. "
        "Rows in brackets re-evaluate the same BatchNorm weights with other statistics. "
        "Best norm: the highest mean, and whether its lead over the runner-up exceeds seed noise "
        "(paired t-test over shared seeds, p < 0.05; n/a with fewer than 2 shared seeds).",
        "",
        tables.metric_table(summary),
        "",
        "## Best norm per batch size",
        "",
        tables.best_table(summary),
        "",
        "## 95% confidence intervals",
        "",
        "Student-t interval over seeds: mean ± t(0.975, n-1) · s / √n.",
        "",
        tables.ci_table(summary),
        "",
        "## Cost",
        "",
        "Mean samples/s and mean peak "
        + ("CUDA" if tables.uses_cuda_memory(summary) else "host (RSS)")
        + " memory over completed seeds.",
        "",
        tables.cost_table(summary),
        "",
        "## Plots",
        "",
    ]
    for caption, path in plots.items():
        lines += [f"![{caption}]({path.name})", ""]
    lines += (
        _problems_section(summary)
        + _unreadable_section(collection)
        + _notes_section(collection.warnings + summary.notes)
    )
    return "\n".join(lines).rstrip() + "\n"
