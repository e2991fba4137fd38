"""report.md: the tables, the plots and a plain-language reading generated from the numbers and the tests."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from norm_experiments.report import tables
from norm_experiments.report.cells import ALPHA, STATUS_ORDER, Analysis, Summary, mode_label, outcome
from norm_experiments.report.collect import Collection

METRIC_DESCRIPTIONS = {
    "val_dice": "final validation mean foreground Dice in eval mode (running statistics for BatchNorm)",
    "best_val_dice": "best validation mean foreground Dice during training (eval mode)",
    "val_hd95": "final validation mean foreground HD95 in mm (lower is better)",
}
TEST = "paired t-test over seeds (two-sided)"


def _norm_name(row: str) -> str:
    return f"`{row}`"


def _where(condition: str) -> str:
    return f" ({condition})" if condition else ""


def _sizes(sizes: list[int]) -> str:
    return ", ".join(map(str, sizes)) if sizes else "none"


def _gap_sentence(analysis: Analysis, summary: Summary, row: str) -> str | None:
    """Where a BN-family norm's batch-statistics evaluation beats its running statistics, significantly or not."""
    label = mode_label(row, "batch")
    gaps = [
        g.comparison
        for g in analysis.gaps
        if g.condition == summary.condition and g.comparison.label == label
    ]
    if not gaps:
        return None
    first = gaps[0]
    significant = [g.batch_size for g in gaps if g.significant and g.a_mean > g.b_mean]
    not_significant = [g.batch_size for g in gaps if g.significant is False]
    text = (
        f"{_norm_name(row)}{_where(summary.condition)}: at batch size {first.batch_size} its running statistics "
        f"score {first.b_mean:.3f} and its batch statistics {first.a_mean:.3f} "
        f"(difference {tables.format_difference(first)}). "
        "Batch statistics beat running statistics significantly (Holm) "
        + (f"at batch sizes {_sizes(significant)}" if significant else "at no batch size")
    )
    if not_significant:
        text += f"; the difference is not significant at {_sizes(not_significant)}"
    return text + "."


def _best_sentence(summary: Summary) -> str | None:
    if not summary.best:
        return None
    parts = [f"bs {bs}: {', '.join(best.indistinguishable)}" for bs, best in summary.best.items()]
    return (
        f"Best norm{_where(summary.condition)}, with every norm the tests cannot tell apart from it "
        f"(Holm, α = {ALPHA}): " + "; ".join(parts) + "."
    )


def _reference_sentence(summary: Summary) -> str | None:
    """Which rows differ significantly from the reference, at which batch sizes."""
    if summary.reference is None or not summary.deltas:
        return None
    worse: dict[str, list[int]] = {}
    better: dict[str, list[int]] = {}
    for d in summary.deltas:
        if d.significant:
            (worse if d.a_mean < d.b_mean else better).setdefault(d.label, []).append(d.batch_size)
    if summary.lower_is_better:
        worse, better = better, worse
    parts = [f"{label} worse at bs {_sizes(sizes)}" for label, sizes in worse.items()]
    parts += [f"{label} better at bs {_sizes(sizes)}" for label, sizes in better.items()]
    found = "; ".join(parts) if parts else "no row differs significantly at any batch size"
    return (
        f"Against {_norm_name(summary.reference)} at the same batch size and seed{_where(summary.condition)} "
        f"(Holm over {len(summary.deltas)} differences): {found}."
    )


def _training_sentence(summary: Summary) -> str | None:
    """How the reference norm's own score moves with batch size, and how many cells were still improving."""
    cells = [c for c in summary.cells.values() if c.with_flag]
    if not cells:
        return None
    flagged = [c for c in cells if c.under_trained]
    text = f"{len(flagged)} of {len(cells)} cells{_where(summary.condition)} had a seed still improving at the end (†)"
    ref = summary.reference
    means = (
        {bs: c.metric.mean for bs in summary.batch_sizes if (c := summary.cell(ref, bs)) and c.metric}
        if ref
        else {}
    )
    if len(means) >= 2:
        lo, hi = min(means), max(means)
        text += (
            f"; {_norm_name(ref)}, whose statistics do not depend on the batch, goes from {means[lo]:.3f} at batch "
            f"size {lo} to {means[hi]:.3f} at {hi}: the batch size changes its training (steps, learning rate), not its normalization"
        )
    return text + "."


def _failure_sentence(analysis: Analysis) -> str | None:
    problems = analysis.problems
    if not problems:
        return None
    counts = Counter(status for _, status, _ in problems)
    detail = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return (
        f"{len(problems)} run(s) have no result ({detail}); they count as missing in the tables "
        "and are listed below."
    )


def reading(analysis: Analysis) -> list[str]:
    """Plain-language lines, each computed from the numbers and tests in the analysis."""
    lines = []
    for summary in analysis.conditions:
        lines += [_gap_sentence(analysis, summary, row) for row in summary.bn_rows]
        lines += [
            _best_sentence(summary),
            _reference_sentence(summary),
            _training_sentence(summary),
        ]
    lines.append(_failure_sentence(analysis))
    found = [line for line in lines if line]
    return found or ["No run completed, so there is nothing to compare yet."]


def _run_counts(collection: Collection, metric: str) -> str:
    counts = Counter(outcome(r, metric)[0] for r in collection.runs)
    ordered = [s for s in STATUS_ORDER if counts.get(s)] + sorted(s for s in counts if s not in STATUS_ORDER)
    text = f"{len(collection.runs)} (" + ", ".join(f"{counts[s]} {s}" for s in ordered) + ")"
    if collection.unreadable:
        text += f"; {len(collection.unreadable)} unreadable metrics.json"
    return text


def _problems_section(analysis: Analysis) -> list[str]:
    if not analysis.problems:
        return []
    rows = [
        [run.name, status, reason or "", str(run.path.parent)] for run, status, reason in analysis.problems
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


def _seed_note(summary: Summary) -> str:
    n = len(summary.seeds)
    return f"n = {n} seed{'s' if n != 1 else ''} per cell ({tables._seeds(summary.seeds)})"


def _family_size(comparisons: list) -> int:
    return sum(1 for c in comparisons if c.test is not None)


def _condition_section(summary: Summary, level: str) -> list[str]:
    metric = summary.metric
    seeds = _seed_note(summary)
    df = max(len(summary.seeds) - 1, 1)
    better = "lower" if summary.lower_is_better else "higher"
    lines = [
        f"{level} {metric} by norm and batch size",
        "",
        tables.metric_table(summary),
        "",
        f"Mean ± sample std over seeds; {seeds}. `n=k/m`: only k of m seeds have a result. Rows in brackets "
        "re-evaluate the same BatchNorm weights with other statistics. † a seed's validation Dice still rose "
        "by more than 0.01 over the second half of its training (under-trained; see the convergence table). "
        f"Best (ties): the {better} mean, and every norm a {TEST} cannot tell apart from it after Holm "
        f"correction over the comparisons at that batch size (α = {ALPHA}; df = {df}).",
        "",
    ]
    if summary.reference:
        lines += [
            f"{level} Difference to {summary.reference} (same batch size, same seed)",
            "",
            tables.delta_table(summary),
            "",
            f"Mean paired difference [95% t-interval]; {seeds}, df = {df}; {TEST}; `*` significant after Holm "
            f"correction over all m = {_family_size(summary.deltas)} differences of this table (α = {ALPHA}). "
            f"{summary.reference} is batch-independent, so a difference to it at the same batch size cancels "
            "what the batch size does to optimization (steps, noise) and leaves what it does to normalization.",
            "",
        ]
    lines += [
        f"{level} Best norm per batch size",
        "",
        tables.best_table(summary),
        "",
        f"{TEST} of the leader against each norm over shared seeds; Holm correction within each batch size; "
        f"{seeds}, df = {df}.",
        "",
        f"{level} HD95 (mm)",
        "",
        tables.hd95_table(summary),
        "",
        "95th-percentile Hausdorff distance in mm, mean ± std over seeds (lower is better); per case and class, "
        "a class the network missed entirely counts as the volume's diagonal, a class absent from a case is "
        "skipped; the mean is over classes present in the validation set.",
        "",
        f"{level} Convergence",
        "",
        tables.convergence_table(summary),
        "",
        "Seeds whose validation Dice rose by more than 0.01 over the second half of training (from the last "
        "validation at or before the middle of the run to the end; trainer.validations spaces them evenly), out "
        "of the seeds that recorded it. With a decaying learning rate a flat end does not prove convergence; "
        "the differences to the reference norm are the control for what the budget does at each batch size.",
        "",
        f"{level} 95% confidence intervals",
        "",
        "Student-t interval over seeds: mean ± t(0.975, n-1) · s / √n.",
        "",
        tables.ci_table(summary),
        "",
        f"{level} Cost",
        "",
        "Mean samples/s and mean peak "
        + ("CUDA" if tables.uses_cuda_memory(summary) else "host (RSS)")
        + " memory over completed seeds.",
        "",
        tables.cost_table(summary),
        "",
    ]
    return lines


def render_markdown(
    analysis: Analysis, collection: Collection, plots: dict[str, Path], header: list[str] | None = None
) -> str:
    """The whole report.md. `plots` maps a caption to a PNG path (linked relative to the document)."""
    metric = analysis.metric
    sweep_list = ", ".join(f"`{d}`" for d in collection.sweep_dirs)
    described = f", {METRIC_DESCRIPTIONS[metric]}" if metric in METRIC_DESCRIPTIONS else ""
    lines = [f"# Normalization vs batch size: {metric}", ""]
    if header:
        lines += header + [""]
    lines += [
        f"- Sweep dirs: {sweep_list}",
        f"- Runs: {_run_counts(collection, metric)}",
        f"- Metric: `{metric}`{described}",
        f"- {_batch_note(collection)}",
    ]
    if analysis.constant:
        lines.append(f"- Every run: {analysis.constant}")
    if len(analysis.conditions) > 1:
        lines.append(
            f"- Conditions (tabled separately): {'; '.join(s.condition for s in analysis.conditions)}"
        )
    lines += ["", "## Reading", ""]
    lines += [f"- {line}" for line in reading(analysis)]
    lines += [""]
    if analysis.gaps:
        df = max(max(len(s.seeds) for s in analysis.conditions) - 1, 1)
        lines += [
            "## BatchNorm evaluation modes: is the gap significant?",
            "",
            tables.gap_table(analysis),
            "",
            f"Batch statistics (and PreciseBN) minus running statistics, same weights, same seeds; {TEST}, "
            f"df = {df}; Holm correction over all m = {_family_size([g.comparison for g in analysis.gaps])} "
            f"comparisons of this table (α = {ALPHA}).",
            "",
        ]
    for summary in analysis.conditions:
        if len(analysis.conditions) > 1:
            lines += [f"## Condition: {summary.condition}", ""]
            lines += _condition_section(summary, "###")
        else:
            lines += _condition_section(summary, "##")
    lines += ["## Plots", ""]
    for caption, path in plots.items():
        lines += [f"![{caption}]({path})", ""]
    lines += (
        _problems_section(analysis)
        + _unreadable_section(collection)
        + _notes_section(collection.warnings + analysis.notes)
    )
    return "\n".join(lines).rstrip() + "\n"
