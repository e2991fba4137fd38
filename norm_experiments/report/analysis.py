"""Split the runs by condition, build the cells, and answer the two declared questions of the study.

Questions (each a family per condition; verdicts.py decides them, and every table and sentence reuses those
verdicts):
- gap: BatchNorm's evaluation-mode gap, batch statistics - running statistics and PreciseBN - running
  statistics, same weights, per BN-family row and batch size;
- reference: every row minus the reference norm (batch-independent) at the same batch size and seed.
No table or sentence ranks norms by their means: whether one norm beats another is only said through a
verdict. A study's declared questions (primary.py) are answered first and apart from these families, which
are exploratory.
"""

from __future__ import annotations

import difflib
from collections import defaultdict
from dataclasses import dataclass, field

from norm_experiments.errors import UserError
from norm_experiments.report.cells import (
    EVAL_MODE_LABELS,
    LOWER_IS_BETTER,
    Cell,
    make_cell,
    mode_label,
    one_per_seed,
    outcome,
    row_labels,
)
from norm_experiments.report.collect import CONDITION_FIELDS, Collection, Run
from norm_experiments.report.errors import lcc_families
from norm_experiments.report.primary import Primary, answer_all
from norm_experiments.report.sequential import Design
from norm_experiments.report.verdicts import ALPHA, DEFAULT_MARGIN, Comparison, Family, compare

# The registry marks this norm as the report's reference (NormRecord.report_reference; a test keeps the two
# equal). A constant here because the report must not import torch, which the registry does.
DEFAULT_REFERENCE = "instance"
GAP_MODES = (
    "batch",
    "precise",
    "batch_alone",
    "precise_more",
)  # each minus running statistics, where recorded


@dataclass
class Summary:
    """One condition of the sweep (e.g. intensity=zscore), cell by cell, with its two families."""

    condition: str  # '' when the sweep has a single condition
    metric: str
    rows: list[str]
    batch_sizes: list[int]
    cells: dict[tuple[str, int], Cell]
    bn_rows: list[str]  # rows whose runs report eval modes
    eval_modes: list[str]  # eval modes present anywhere, in display order
    seeds: list[int]
    reference: str | None  # the row differences are taken to (None: not in this condition)
    deltas: Family  # every row minus the reference
    gaps: Family  # BatchNorm's evaluation-mode gaps
    problems: list[tuple[Run, str, str]]  # (run, status, reason) for every run without a result
    batch_stats_windows: list[int]  # windows per forward in the "batch" evaluation mode ([]: not recorded)
    notes: list[str] = field(default_factory=list)
    remedies: tuple[Family, ...] = ()  # the largest-component remedy on Dice and on HD95 (report/errors.py)

    @property
    def lower_is_better(self) -> bool:
        return self.metric in LOWER_IS_BETTER

    def cell(self, row: str, batch_size: int) -> Cell | None:
        return self.cells.get((row, batch_size))

    def delta(self, label: str, batch_size: int) -> Comparison | None:
        return next(
            (d for d in self.deltas.comparisons if d.label == label and d.batch_size == batch_size), None
        )


@dataclass
class Analysis:
    """The whole report: one Summary per condition."""

    metric: str
    conditions: list[Summary]
    constant: str  # condition fields shared by every run, e.g. 'budget_unit=patches'
    reference: str
    margin: float
    alpha: float = ALPHA
    primary: list[Primary] = field(default_factory=list)  # the declared questions, per condition

    @property
    def problems(self) -> list[tuple[Run, str, str]]:
        return [p for s in self.conditions for p in s.problems]

    @property
    def notes(self) -> list[str]:
        return [n for s in self.conditions for n in s.notes]

    @property
    def gaps(self) -> list[Family]:
        return [s.gaps for s in self.conditions if s.gaps.comparisons]


def reference_family(summary_cells: dict[tuple[str, int], Cell], reference: str, family: Family) -> Family:
    """Every row minus the reference row, at the same batch size and seed."""
    for (row, bs), cell in sorted(summary_cells.items()):
        ref = summary_cells.get((reference, bs))
        if row == reference or ref is None or not ref.by_seed or not cell.by_seed:
            continue
        family.comparisons.append(compare(row, reference, bs, cell.values(), ref.values()))
    return family.decide()


def gap_family(cells: dict[tuple[str, int], Cell], bn_rows: list[str], family: Family) -> Family:
    """Batch statistics and PreciseBN minus running statistics, for every BN row and batch size (Dice)."""
    for (row, bs), cell in sorted(cells.items()):
        running = cell.values("running")
        if row not in bn_rows or not running.by_seed:
            continue
        for mode in GAP_MODES:
            if cell.values(mode).by_seed:
                label, against = mode_label(row, mode), mode_label(row, "running")
                family.comparisons.append(compare(label, against, bs, cell.values(mode), running))
    return family.decide()


def _mode_order(modes: set[str]) -> list[str]:
    known = [m for m in EVAL_MODE_LABELS if m in modes]
    return known + sorted(modes - set(known))


def _check_metric(collection: Collection, metric: str) -> None:
    completed = [r for r in collection.runs if r.completed]
    if not completed or any(r.value(metric) is not None for r in completed):
        return
    numeric = sorted({k for r in completed for k in r.data if r.value(k) is not None})
    raise UserError(
        f"metric '{metric}' not found in any completed run{_did_you_mean(metric, numeric)}; numeric fields: "
        f"{', '.join(numeric)}"
    )


def check_reference(collection: Collection, reference: str) -> None:
    """Refuse a reference whose own training depends on the batch: differences to it would mix two effects.
    A reference other than the default that no run trained is a typo: refused with the sweep's norms (the
    default may be absent: the report then compares nothing with it and says so)."""
    norms = sorted({r.norm for r in collection.runs if r.norm})
    if reference != DEFAULT_REFERENCE and norms and reference not in norms:
        raise UserError(
            f"--reference {reference}: no run of these sweeps trained that norm{_did_you_mean(reference, norms)}; "
            f"their norms: {', '.join(norms)}"
        )
    if any(r.norm == reference and r.batch_dependent for r in collection.runs):
        raise UserError(
            f"--reference {reference}: its runs record batch_dependent: true; the reference must be a "
            f"batch-independent norm (default: {DEFAULT_REFERENCE})"
        )


def _did_you_mean(given: str, names: list[str]) -> str:
    close = difflib.get_close_matches(given, names, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _setting(row: str) -> str:
    """The bracketed settings of a row label ("samples_budget=2400" of "group [samples_budget=2400]"), or ''."""
    return row.partition(" [")[2].removesuffix("]")


def summarize_condition(
    condition: str,
    runs: list[Run],
    metric: str,
    reference: str,
    margin: float = DEFAULT_MARGIN,
    own_seeds: bool = False,
) -> Summary:
    """Cells, differences to the reference and BatchNorm's gaps for the runs of one condition. A grid expects
    every seed of the condition in every cell (of a row split off by a setting: every seed of that row); with
    `own_seeds` (a study, whose sweeper stops running a cell
    once its questions are decided) a cell expects the seeds it was run with."""
    notes: list[str] = []
    labels = row_labels(runs, notes)
    grouped: dict[tuple[str, int], list[Run]] = defaultdict(list)
    for run in runs:
        grouped[(labels[run], run.batch_size)].append(run)
    seeds = sorted({r.seed for r in runs})
    # A cell expects the seeds run with its row's setting in any row: a row split off by a setting (another
    # budget: "group [samples_budget=2400]") those run with it, a plain row those of the plain rows.
    setting_seeds: dict[str, set[int]] = defaultdict(set)
    for run in runs:
        setting_seeds[_setting(labels[run])].add(run.seed)
    cells = {}
    for key, group in grouped.items():
        kept = one_per_seed(group, notes)
        expected = len(setting_seeds[_setting(key[0])])
        cells[key] = make_cell(key[0], kept, metric, len(kept) if own_seeds else expected)
    rows = sorted({row for row, _ in cells})
    bn_rows = sorted({c.row for c in cells.values() if any(r.is_bn_family for r in c.runs)})
    lower = metric in LOWER_IS_BETTER
    # The gap and the remedy's Dice family compare Dice whatever the metric: --margin is in the metric's
    # units, so they take it only when the metric is Dice.
    dice_margin = margin if "dice" in metric else DEFAULT_MARGIN
    has_reference = reference in rows
    deltas = Family("reference", condition, margin=margin, lower_is_better=lower)
    if has_reference:
        reference_family(cells, reference, deltas)
    problems = []
    for cell in sorted(cells.values(), key=lambda c: (c.row, c.batch_size)):
        for run in cell.runs:
            status, reason = outcome(run, metric)
            if status != "completed":
                problems.append((run, status, reason or ""))
    windows = {r.data.get("batch_stats_windows") for r in runs if r.is_bn_family and r.completed}
    return Summary(
        condition=condition,
        metric=metric,
        rows=rows,
        batch_sizes=sorted({bs for _, bs in cells}),
        cells=cells,
        bn_rows=bn_rows,
        eval_modes=_mode_order({m for c in cells.values() for m in c.eval_modes}),
        seeds=seeds,
        reference=reference if has_reference else None,
        deltas=deltas,
        gaps=gap_family(cells, bn_rows, Family("gap", condition, margin=dice_margin)),
        problems=problems,
        batch_stats_windows=sorted(int(w) for w in windows if isinstance(w, int)),
        notes=notes,
        remedies=lcc_families(cells, condition, dice_margin),
    )


def condition_fields(runs: list[Run]) -> tuple[list[str], str]:
    """(fields that vary between runs, 'field=value' of the fields every run shares)."""
    varying, constant = [], []
    for name in CONDITION_FIELDS:
        values = {str(r.data.get(name)) for r in runs if r.data.get(name) is not None}
        if len(values) > 1:
            varying.append(name)
        elif values:
            constant.append(f"{name}={values.pop()}")
    return varying, ", ".join(constant)


def analyze(
    collection: Collection,
    metric: str = "val_dice",
    reference: str = DEFAULT_REFERENCE,
    margin: float = DEFAULT_MARGIN,
    design: Design | None = None,
    stopped: str | None = None,
    minutes: float | None = None,
) -> Analysis:
    """Split the runs by condition and summarize each; with a study design, answer its declared questions in
    each condition too. UserError for an unknown metric, a batch-dependent reference, or a margin that is
    not positive."""
    if not margin > 0:
        raise UserError(f"--margin must be positive, got {margin}")
    _check_metric(collection, metric)
    check_reference(collection, reference)
    varying, constant = condition_fields(collection.runs)
    by_condition: dict[str, list[Run]] = defaultdict(list)
    for run in collection.runs:
        by_condition[run.condition(varying)].append(run)
    conditions = [
        summarize_condition(c, runs, metric, reference, margin, own_seeds=design is not None)
        for c, runs in sorted(by_condition.items())
    ]
    analysis = Analysis(metric, conditions, constant, reference, margin)
    if design is not None:
        for summary in conditions:
            primary = answer_all(design, summary.cells, summary.condition)
            primary.stopped, primary.minutes = stopped, minutes
            analysis.primary.append(primary)
    return analysis
