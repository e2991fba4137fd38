"""The Reading: plain-language lines built only from the families' verdicts and the counts.

No line says more than its verdicts: every comparison is listed under its verdict (better, worse, equivalent
within the margin, inconclusive, untestable) with its interval, in either direction.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from norm_experiments.report.analysis import GAP_MODES, Analysis, Summary
from norm_experiments.report.cells import mode_label
from norm_experiments.report.primary_text import sentence
from norm_experiments.report.verdicts import Comparison, Verdict

ORDER = (Verdict.BETTER, Verdict.WORSE, Verdict.EQUIVALENT, Verdict.INCONCLUSIVE, Verdict.UNTESTABLE)
GAP_NAMES = {
    "batch": "batch statistics",
    "precise": "PreciseBN",
    "batch_alone": "batch statistics of each window alone",
    "precise_more": "PreciseBN over 4x the patches",
}


def _name(row: str) -> str:
    return f"`{row}`"


def _where(condition: str) -> str:
    return f" ({condition})" if condition else ""


def _evidence(c: Comparison) -> str:
    if c.verdict is Verdict.UNTESTABLE:
        return f"{c.batch_size} ({c.n_seeds} shared seed{'s' if c.n_seeds != 1 else ''})"
    return f"{c.batch_size} ({c.difference:+.3f} [{c.low:+.3f}, {c.high:+.3f}])"


def verdict_clauses(comparisons: Sequence[Comparison], margin: float) -> str:
    """'better at bs 1 (+0.508 [+0.474, +0.542]); inconclusive at bs 8 (...)': every comparison, by verdict."""
    parts = []
    for verdict in ORDER:
        found = [c for c in comparisons if c.verdict is verdict]
        if found:
            word = f"equivalent within ±{margin:g}" if verdict is Verdict.EQUIVALENT else verdict.value
            parts.append(f"{word} at bs " + ", ".join(_evidence(c) for c in found))
    return "; ".join(parts)


def gap_sentences(summary: Summary) -> list[str]:
    """Per BN row and mode: the evaluation mode minus running statistics, every batch size by its verdict."""
    lines = []
    family = summary.gaps
    for row in summary.bn_rows:
        for mode in GAP_MODES:
            label = mode_label(row, mode)
            found = [c for c in family.comparisons if c.label == label]
            if found:
                lines.append(
                    f"{_name(row)}{_where(summary.condition)}, {GAP_NAMES[mode]} minus running statistics (same "
                    f"weights): {verdict_clauses(found, family.margin)}."
                )
    return lines


def _per_row(summary: Summary, family, matches, lead: str) -> list[str]:
    """One sentence per row that has comparisons in `family`: the lead, then every batch size by verdict."""
    lines = []
    for row in summary.rows:
        found = [c for c in family.comparisons if matches(c, row)]
        if found:
            lines.append(
                f"{lead.format(row=_name(row), where=_where(summary.condition))}: "
                f"{verdict_clauses(found, family.margin)}."
            )
    return lines


def reference_sentences(summary: Summary, reference: str) -> list[str]:
    """Per row: the row minus the reference at each batch size, by verdict."""
    if summary.reference is None:
        split = [row for row in summary.rows if row.startswith(f"{reference} [")]
        if split:  # the reference's runs differ in a setting beyond the seed: no one row to subtract
            return [
                f"The {_name(reference)} runs{_where(summary.condition)} differ in more than the seed, so they "
                f"are split into {len(split)} rows ({', '.join(split)}) and none of them is the reference: no "
                "difference to the reference was tested."
            ]
        return [
            f"No {_name(reference)} runs{_where(summary.condition)}: no difference to the reference was tested."
        ]
    lead = "{row} minus " + _name(reference) + "{where}, same batch size and seed"
    return _per_row(summary, summary.deltas, lambda c, row: c.label == row, lead)


def remedy_sentences(summary: Summary) -> list[str]:
    """Per row: keeping the largest component minus as predicted, on Dice and on HD95, by verdict."""
    lines = []
    for family in summary.remedies:
        metric = "HD95" if family.lower_is_better else "Dice"
        lead = "{row}{where}, largest connected component kept minus as predicted, " + metric
        lines += _per_row(summary, family, lambda c, row: c.against == row, lead)
    return lines


def convergence_sentence(summary: Summary) -> str | None:
    """Counts of seeds and cells still improving, and what the flags were computed on."""
    cells = [c for c in summary.cells.values() if c.with_flag]
    if not cells:
        return None
    seeds = sum(c.with_flag for c in cells)
    improving = sum(c.still_improving for c in cells)
    every = sum(1 for c in cells if c.still_improving == c.with_flag)
    none = sum(1 for c in cells if c.still_improving == 0)
    metrics = ", ".join(sorted({m for c in cells for m in c.flag_metrics}))
    return (
        f"Convergence{_where(summary.condition)}: {improving} of {seeds} seeds were still improving at the end "
        f"(flag computed on: {metrics}); in {every} of {len(cells)} cells every seed was, in {none} none was."
    )


def reference_trend_sentence(summary: Summary) -> str | None:
    """How the reference norm's own mean moves with the batch size (descriptive)."""
    ref = summary.reference
    if ref is None:
        return None
    means = {bs: c.metric.mean for bs in summary.batch_sizes if (c := summary.cell(ref, bs)) and c.metric}
    if len(means) < 2:
        return None
    lo, hi = min(means), max(means)
    return (
        f"{_name(ref)}{_where(summary.condition)} scores {means[lo]:.3f} at batch size {lo} and {means[hi]:.3f} at "
        f"{hi} (descriptive, not tested); its normalization does not depend on the batch, so a change here comes "
        "from what the batch size does to training (steps, learning rate)."
    )


def failure_sentence(analysis: Analysis) -> str | None:
    problems = analysis.problems
    if not problems:
        return None
    counts = Counter(status for _, status, _ in problems)
    detail = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return f"{len(problems)} run(s) have no result ({detail}); they count as missing in the tables and are listed below."


def reading(analysis: Analysis) -> list[str]:
    """Plain-language lines, each computed from the verdicts and counts in the analysis."""
    lines: list[str | None] = [sentence(found) for p in analysis.primary for found in p.answers]
    if analysis.primary:
        lines.append("Exploratory (not declared; each family corrected on its own):")
    for summary in analysis.conditions:
        lines += gap_sentences(summary)
        lines += reference_sentences(summary, analysis.reference)
        lines += remedy_sentences(summary)
        lines += [convergence_sentence(summary), reference_trend_sentence(summary)]
    lines.append(failure_sentence(analysis))
    found = [line for line in lines if line]
    return found or ["No run completed, so there is nothing to compare yet."]
