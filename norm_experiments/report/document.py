"""report.md: the tables, each with its method and power line, the plots, and the Reading."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from norm_experiments.report import tables
from norm_experiments.report.analysis import Analysis, Summary
from norm_experiments.report.cells import STATUS_ORDER, Cell, outcome
from norm_experiments.report.collect import Collection, Run
from norm_experiments.report.errors import error_rows
from norm_experiments.report.model import NO_CASE_SCORES, SEEDS_AND_CASES, SEEDS_ONLY
from norm_experiments.report.primary_text import primary_lines
from norm_experiments.report.provenance import preprocessing_lines
from norm_experiments.report.reading import reading
from norm_experiments.report.verdicts import Family, detectable_difference

METRIC_DESCRIPTIONS = {
    "val_dice": "final validation mean foreground Dice in eval mode (running statistics for BatchNorm)",
    "best_val_dice": "best validation mean foreground Dice during training (eval mode)",
    "val_hd95": "final validation mean foreground HD95 in mm (lower is better)",
}
MODEL_TEXT = {
    SEEDS_AND_CASES: "a crossed seeds × validation-cases model of the per-case scores (SE from the two-way "
    "mean squares, Satterthwaite df)",
    SEEDS_ONLY: "a paired t-test over seeds (df = seeds - 1)",
}
REPORT_TITLE = "# Normalization vs batch size: "  # the first line of every report.md (the metric follows)
STATISTICS_DOC = "docs/explanation/statistics.md"
EXPLORATORY = (
    "**Exploratory.** The tables below were not declared before the study: their verdicts hold within each "
    "table's own family (Bonferroni), not together with the declared questions above, and their seeds are "
    "those the declared questions needed."
)


def _direction(family: Family) -> str:
    """How better and worse are read off a difference's interval: lower is better for HD95."""
    if family.lower_is_better:
        return "better / worse = entirely below / above 0 (lower is better)"
    return "better / worse = entirely above / below 0"


def method_line(family: Family, what: str) -> str:
    """What was compared, the model used, the family's correction and how verdicts are read."""
    if not family.m:
        return f"{what}. Nothing testable: every comparison has fewer than 2 shared seeds."
    pct = 100 * (1 - family.alpha_each)
    methods = family.methods
    seeds_only = [c.estimate for c in family.tested if c.estimate.method == SEEDS_ONLY]  # type: ignore[union-attr]
    # Why each § comparison is over seeds only (model.paired says: no per-case scores, one case, or seeds
    # that scored different cases).
    why = " or ".join(sorted({e.seeds_only_because or NO_CASE_SCORES for e in seeds_only}))  # type: ignore[union-attr]
    if len(methods) == 2:
        model = (
            f"{MODEL_TEXT[SEEDS_AND_CASES]}; {len(seeds_only)} comparison(s) marked § come from {why} and use "
            f"{MODEL_TEXT[SEEDS_ONLY]}"
        )
    else:
        model = MODEL_TEXT[methods[0]] + (f" (§: {why})" if methods == [SEEDS_ONLY] else "")
    return (
        f"{what}. Model: {model}. Interval: two-sided {pct:.4g}% (Bonferroni over the m = {family.m} tested "
        f"comparisons of this table, α = {family.alpha} family-wise, α' = {family.alpha_each:.3g} each). Verdict "
        f"read off that interval: {_direction(family)}; equivalent = inside "
        f"±{family.margin:g} (two one-sided tests); otherwise inconclusive; untestable = fewer than 2 shared "
        f"seeds. Formulas: {STATISTICS_DOC}."
    )


def power_line(family: Family, unit_check: float | None = 0.05) -> str:
    """The smallest difference the design detects with 80 % power, and the margin it can confirm."""
    power = family.power()
    if power is None:
        return "Power: nothing testable (fewer than 2 shared seeds everywhere)."
    d, e = power.detectable, power.confirmable
    text = (
        f"Power (80 %, two-sided, α' = {power.alpha_each:.3g}, at the observed standard errors): this design "
        f"detects differences of {d[0]:.3f} (median over the {family.m} comparisons; {d[1]:.3f}–{d[2]:.3f}) and "
        f"can confirm equivalence, when the true difference is 0, within margins of {e[0]:.3f} "
        f"({e[1]:.3f}–{e[2]:.3f}); the margin used is ±{family.margin:g}"
    )
    if unit_check is not None and not family.lower_is_better:
        k = sum(1 for c in family.tested if detectable_difference(c.estimate, power.alpha_each) <= unit_check)  # type: ignore[arg-type]
        text += f"; a difference of {unit_check} is detected with 80 % power in {k} of {family.m}"
    return text + "."


def batch_stats_text(windows: list[int]) -> str:
    """What 'batch stats' means in these runs: how many sliding windows one forward pass normalizes together."""
    if not windows:
        return (
            "windows per forward not recorded by these runs (older records: one sliding-window batch of "
            "trainer.sw_batch_size windows of one volume)"
        )
    parts = []
    for k in windows:
        if k == 1:
            parts.append("each window alone, normalized with its own statistics (batch_stats_windows = 1)")
        else:
            parts.append(
                f"{k} sliding windows of one validation volume per forward, normalized together with their own "
                f"statistics (batch_stats_windows = {k}), not the training batch"
            )
    return "; ".join(parts) + ("" if len(windows) == 1 else " (rows are split by it)")


def _run_counts(collection: Collection, metric: str) -> str:
    counts = Counter(outcome(r, metric)[0] for r in collection.runs)
    ordered = [s for s in STATUS_ORDER if counts.get(s)] + sorted(s for s in counts if s not in STATUS_ORDER)
    text = f"{len(collection.runs)} (" + ", ".join(f"{counts[s]} {s}" for s in ordered) + ")"
    if collection.unreadable:
        text += f"; {len(collection.unreadable)} unreadable metrics.json"
    return text


def _section(title: str, body: list[str]) -> list[str]:
    return [title, ""] + body + [""] if body else []


def _problems_section(analysis: Analysis) -> list[str]:
    rows = [
        [run.name, status, reason or "", str(run.path.parent)] for run, status, reason in analysis.problems
    ]
    return _section(
        "## Runs without a result",
        [tables.markdown_table(["run", "status", "error", "folder"], rows, align="llll")] if rows else [],
    )


def _batch_note(runs: list[Run]) -> str:
    note = "Batch size = volumes per optimizer step (`data.batch_size`)."
    if any(r.data.get("patches_per_volume", 1) not in (1, None) for r in runs):
        note += " Some runs draw several patches per volume: BatchNorm then sees `effective_batch` patches."
    if any(r.accumulate_steps > 1 for r in runs):
        note += (
            " Rows `[accumulate k]`: the optimizer steps every k micro-batches (gradient accumulation) while "
            "BatchNorm still sees one micro-batch; never averaged with runs without accumulation."
        )
    return note


def _span(pair: object) -> str:
    if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, int) for v in pair)):
        return "?"
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}–{pair[1]}"


def group_lines(runs: list[Run]) -> list[str]:
    """'group: 4 groups per layer, 2–8 channels per group (10 layers)', per norm with GroupNorm layers, from
    the records' group_layers: whether a GroupNorm is InstanceNorm or LayerNorm at some layer."""
    found: dict[str, set[str]] = {}
    for run in runs:
        layers = run.data.get("group_layers")
        if isinstance(layers, dict):
            text = (
                f"{_span(layers.get('groups'))} groups per layer, {_span(layers.get('channels_per_group'))} "
                f"channels per group ({layers.get('layers', '?')} layers)"
            )
            found.setdefault(run.norm, set()).add(text)
    return [
        f"GroupNorm layers of `{norm}`: {'; '.join(sorted(texts))}" for norm, texts in sorted(found.items())
    ]


def _seed_note(summary: Summary, study: bool) -> str:
    counts = sorted({len(c.runs) for c in summary.cells.values()})
    if len(counts) > 1:
        why = (
            "a study stops running a cell once the questions that compare it are decided"
            if study
            else "`n=k/m` marks the cells with fewer seeds that have a result; see the runs without a result"
        )
        return f"n = {counts[0]} to {counts[-1]} seeds per cell (seeds {_seed_list(summary.seeds)}; {why})"
    n = len(summary.seeds)
    return f"n = {n} seed{'s' if n != 1 else ''} per cell ({', '.join(map(str, summary.seeds))})"


def _seed_list(seeds: list[int]) -> str:
    """'0-10' for a run of consecutive seeds, else the seeds themselves."""
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


def _gap_section(summary: Summary, level: str, study: bool) -> list[str]:
    family = summary.gaps
    if not family.comparisons:
        return []
    what = (
        "Batch statistics (and PreciseBN) minus running statistics, same weights, paired by seed and validation case, validation "
        f"Dice; batch stats = {batch_stats_text(summary.batch_stats_windows)}; {_seed_note(summary, study)}"
    )
    return [
        f"{level} BatchNorm evaluation modes: the gap",
        "",
        tables.gap_table(family),
        "",
        method_line(family, what),
        "",
        power_line(family),
        "",
    ]


def _errors_section(summary: Summary, level: str) -> list[str]:
    """Where the errors are (descriptive), and the largest-component remedy with its verdicts."""
    rows = error_rows(summary.cells)
    lines = []
    if rows:
        lines += [
            f"{level} Where the errors are",
            "",
            tables.error_table(rows),
            "",
            "Final evaluation, per validation case, then the mean over cases and over seeds (descriptive): "
            "false foreground (predicted where the truth is background) in mL, the part of it more than 10 mm "
            "from any true foreground voxel, outside the head (the image above a low threshold, holes filled), "
            "and where a window of the patch size centred there holds under 25 % head voxels; its connected "
            "pieces; missed foreground. What the columns mean: training/error_locations.py.",
            "",
        ]
    for family, digits, what in zip(summary.remedies, (3, 1), ("Dice", "HD95 in mm (lower is better)")):
        if not family.comparisons:
            continue
        method = method_line(
            family,
            f"The same predictions with each class's largest connected component kept, minus as predicted, "
            f"paired by seed and validation case; {what}",
        )
        lines += [
            f"{level} Remedy: keep the largest connected component ({what.split(' ')[0]})",
            "",
            tables.remedy_table(family, digits),
            "",
            method,
            "",
            power_line(family, unit_check=0.05 if digits == 3 else None),
            "",
        ]
    return lines


def _condition_section(summary: Summary, level: str, study: bool) -> list[str]:
    metric, seeds = summary.metric, _seed_note(summary, study)
    lines = [
        f"{level} {metric} by norm and batch size",
        "",
        tables.metric_table(summary),
        "",
        f"Mean ± sample std over seeds of the recorded `{metric}` (descriptive); {seeds}. `n=k/m`: only k of m "
        "seeds have a result. Rows in brackets re-evaluate the same BatchNorm weights with other statistics. "
        "†k/n: k of the n seeds with a convergence flag were still improving at the end (see Convergence). "
        "Descriptive: which norm is better is said only by a verdict.",
        "",
    ]
    lines += _gap_section(summary, level, study)
    if summary.reference:
        what = (
            f"Each norm minus {summary.reference} at the same batch size, paired by seed and validation case; {seeds}. Both are "
            "trained with the same budget at that batch size; the difference does not separate the norm from its "
            "interaction with what the batch size does to optimization"
        )
        lines += [
            f"{level} Difference to {summary.reference} (same batch size, same seed)",
            "",
            tables.delta_table(summary),
            "",
            method_line(summary.deltas, what),
            "",
            power_line(summary.deltas),
            "",
            f"{level} Norms by verdict against {summary.reference}, per batch size",
            "",
            tables.best_table(summary),
            "",
            "The verdicts of the difference table above, sorted; no test of its own.",
            "",
        ]
    lines += _errors_section(summary, level)
    lines += [
        f"{level} HD95 (mm)",
        "",
        tables.hd95_table(summary),
        "",
        "95th-percentile Hausdorff distance in mm, mean ± std over seeds (descriptive; lower is better); per "
        "case and class, a class the network missed entirely counts as the volume's diagonal, a class absent "
        "from a case is skipped.",
        "",
        f"{level} Convergence",
        "",
        tables.convergence_table(summary),
        "",
        "k/n: of the n seeds that recorded a convergence flag, k were still improving at the end of training; "
        "the last column names the metric each flag was computed on (from the records' `convergence.metric`). "
        "A flat end does not prove convergence.",
        "",
        f"{level} 95% confidence intervals of the cell means",
        "",
        tables.ci_table(summary),
        "",
        "Same model as the comparisons, two-sided 95% (not adjusted: one interval per cell). With per-case "
        "scores the interval covers the mean over other validation cases too, so it includes the case-to-case "
        f"spread that the ± std over seeds above does not; § seeds only. "
        f"Formulas: {STATISTICS_DOC}.",
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


PREDICTIONS = "predictions"  # a run folder's label maps (trainer.save_predictions; training/predictions.py)


def worst_cases(summary: Summary) -> list[tuple[Cell, Run, str, float]]:
    """Per cell, the validation case with the lowest running-statistics Dice among its runs that saved
    predictions: (cell, run, case, Dice)."""
    found = []
    for cell in summary.cells.values():
        candidates = []
        for run in cell.runs:
            scores = run.case_scores("running", "dice") if run.completed else None
            if scores and (run.path.parent / PREDICTIONS).is_dir():
                case = min(scores, key=lambda c: (scores[c], c))
                candidates.append((scores[case], str(run.path), run, case))
        if candidates:
            dice, _, run, case = min(candidates, key=lambda c: (c[0], c[1]))
            found.append((cell, run, case, dice))
    return found


def _predictions_section(analysis: Analysis, link_base: Path | None) -> list[str]:
    rows = []
    for summary in analysis.conditions:
        for cell, run, case, dice in worst_cases(summary):
            folder = run.path.parent / PREDICTIONS / case
            link = Path(os.path.relpath(folder, link_base)) if link_base is not None else folder
            where = f"{summary.condition}: " if summary.condition else ""
            rows.append(
                f"- {where}{cell.row}, bs {cell.batch_size}: [{case}]({link}) of `{run.name}`, Dice {dice:.3f}"
            )
    if not rows:
        return []
    note = (
        "The case with the lowest Dice (running statistics) of each cell, among runs that saved predictions: "
        "its folder holds a label map and an error map per evaluation mode to open over the image (how: "
        "docs/howto/view_predictions.md)."
    )
    return ["## Worst cases to look at", "", note, "", *rows, ""]


def render_markdown(
    analysis: Analysis,
    collection: Collection,
    plots: dict[str, Path],
    header: list[str] | None = None,
    link_base: Path | None = None,
) -> str:
    """The whole report.md. `plots` maps a caption to a PNG path (linked relative to the document);
    `link_base`: the document's folder, to which links to run folders are relative (None: as found)."""
    metric = analysis.metric
    sweep_list = ", ".join(f"`{d}`" for d in collection.sweep_dirs)
    described = f", {METRIC_DESCRIPTIONS[metric]}" if metric in METRIC_DESCRIPTIONS else ""
    lines = [f"{REPORT_TITLE}{metric}", ""]
    if header:
        lines += header + [""]
    lines += [
        f"- Sweep dirs: {sweep_list}",
        f"- Runs: {_run_counts(collection, metric)}",
        f"- Metric: `{metric}`{described}",
        f"- {_batch_note(collection.runs)}",
        f"- Reference norm: `{analysis.reference}`; equivalence margin ±{analysis.margin:g}; α = {analysis.alpha} "
        "per family (Bonferroni).",
    ]
    lines += [
        f"- Preprocessing (from the runs' records): {line}" for line in preprocessing_lines(collection.runs)
    ]
    lines += [f"- {line}" for line in group_lines(collection.runs)]
    if analysis.constant:
        lines.append(f"- Every run: {analysis.constant}")
    if len(analysis.conditions) > 1:
        lines.append(
            f"- Conditions (tabled separately): {'; '.join(s.condition for s in analysis.conditions)}"
        )
    lines.append("")
    for primary in analysis.primary:
        lines += primary_lines(primary)
    lines += ["## Reading", ""] + [f"- {line}" for line in reading(analysis)] + [""]
    if analysis.primary:
        lines += [EXPLORATORY, ""]
    for summary in analysis.conditions:
        if len(analysis.conditions) > 1:
            lines += [f"## Condition: {summary.condition}", ""]
            lines += _condition_section(summary, "###", bool(analysis.primary))
        else:
            lines += _condition_section(summary, "##", bool(analysis.primary))
    lines += ["## Plots", ""]
    for caption, path in plots.items():
        lines += [f"![{caption}]({path})", ""]
    lines += _predictions_section(analysis, link_base)
    lines += _problems_section(analysis)
    lines += _section("## Unreadable metrics.json", [f"- `{p}`: {why}" for p, why in collection.unreadable])
    lines += _section("## Notes", [f"- {note}" for note in collection.warnings + analysis.notes])
    return "\n".join(lines).rstrip() + "\n"
