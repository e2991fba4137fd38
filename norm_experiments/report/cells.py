"""Group runs into conditions and (norm, batch size) cells, summarize each over seeds, and run the tests.

Statistics (stated under every table of the report):
- A cell's value is the mean over seeds, with the sample std and a 95% Student-t interval (df = n - 1).
- Every comparison is a paired t-test over the seeds two cells share (same seed = same data split, same
  initialisation stream), with a 95% t-interval of the mean difference.
- Every family of comparisons is Holm-Bonferroni corrected: a difference is marked significant only where its
  adjusted p < 0.05. Families: the differences to the reference norm in one condition; the comparisons of the
  best norm with each other norm at one batch size; all BatchNorm evaluation-mode gaps of the report.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from norm_experiments.errors import UserError
from norm_experiments.report.collect import CONDITION_FIELDS, Collection, Run
from norm_experiments.report.stats import Interval, PairedTest, holm, mean, paired_t_test, t_interval
from norm_experiments.run_record import NO_RESULT

# Config fields that are not table axes but must not be averaged together when they differ between runs
# of one norm (e.g. two merged sweeps with different models, or GroupNorm with 8 and 16 groups). When one
# varies, it becomes part of the row label: "group [norm_options=groups=8]".
VARIANT_FIELDS = ("model", "patches_per_volume", "norm_options")

# Order in which run statuses are listed in a cell.
STATUS_ORDER = ("completed", "failed", "diverged", "interrupted", "running")

EVAL_MODE_LABELS = {"running": "running stats", "precise": "precise BN", "batch": "batch stats"}

# Metrics where a smaller value is better (a distance); every other metric: larger is better.
LOWER_IS_BETTER = frozenset({"val_hd95"})

ALPHA = 0.05  # family-wise error rate of every Holm-corrected family
DEFAULT_REFERENCE = "instance"  # batch-independent: differences to it cancel what batch size does to training


@dataclass
class Cell:
    """All runs of one row (a norm, possibly with a variant) at one batch size, in one condition."""

    row: str
    norm: str
    batch_size: int
    runs: list[Run]
    n_expected: int  # seeds expected in every cell: the union of seeds seen anywhere in the condition
    metric_key: str  # the field summarized (val_dice unless --metric says otherwise)
    metric: Interval | None  # over completed runs with a finite metric value
    by_seed: dict[int, float]  # metric value per completed seed, for paired tests
    eval_modes: dict[str, Interval] = field(default_factory=dict)
    mode_by_seed: dict[str, dict[int, float]] = field(default_factory=dict)
    hd95: Interval | None = None
    eval_modes_hd95: dict[str, Interval] = field(default_factory=dict)
    still_improving: int = 0  # completed seeds whose validation Dice still rose at the end
    with_flag: int = 0  # completed seeds that recorded a convergence flag
    samples_per_s: float | None = None
    peak_memory_mb: float | None = None
    peak_cuda_memory_mb: float | None = None

    def values(self, mode: str | None = None) -> dict[int, float]:
        """Per-seed values of the cell's metric, or of one BatchNorm evaluation mode."""
        return self.by_seed if mode is None else self.mode_by_seed.get(mode, {})

    def interval(self, mode: str | None = None) -> Interval | None:
        return self.metric if mode is None else self.eval_modes.get(mode)

    @property
    def n_completed(self) -> int:
        return len(self.by_seed)

    @property
    def status_counts(self) -> Counter:
        return Counter(outcome(r, self.metric_key)[0] for r in self.runs)

    @property
    def n_failed(self) -> int:
        counts = self.status_counts
        return sum(counts[s] for s in NO_RESULT)

    @property
    def n_missing(self) -> int:
        return max(0, self.n_expected - len(self.runs))

    @property
    def under_trained(self) -> bool:
        return self.still_improving > 0

    @property
    def status_summary(self) -> str:
        counts = self.status_counts
        parts = [f"{counts[s]} {s}" for s in STATUS_ORDER if counts.get(s)]
        parts += [f"{n} {s}" for s, n in sorted(counts.items()) if s not in STATUS_ORDER]
        if self.n_missing:
            parts.append(f"{self.n_missing} missing")
        return ", ".join(parts)


@dataclass
class Comparison:
    """One paired comparison a - b over seeds, and its p-value after the Holm correction of its family."""

    label: str  # what a is (a row, or a row with an evaluation mode)
    against: str  # what b is
    batch_size: int
    a_mean: float
    b_mean: float
    test: PairedTest | None  # None: fewer than 2 shared seeds
    p_holm: float | None = None

    @property
    def significant(self) -> bool | None:
        return None if self.p_holm is None else self.p_holm < ALPHA


@dataclass
class BestNorm:
    """The leading row at one batch size, and which rows the data cannot tell apart from it."""

    batch_size: int
    leader: str
    leader_mean: float
    comparisons: list[Comparison] = field(default_factory=list)  # leader vs every other row (Holm family)

    @property
    def tied(self) -> list[str]:
        """Rows not significantly worse than the leader (after Holm), or untestable (< 2 shared seeds)."""
        return [c.against for c in self.comparisons if not c.significant]

    @property
    def indistinguishable(self) -> list[str]:
        return [self.leader, *self.tied]


@dataclass
class GapTest:
    """BatchNorm's evaluation-mode gap in one condition at one batch size: `mode` minus running statistics."""

    condition: str
    comparison: Comparison


@dataclass
class Summary:
    """One condition of the sweep (e.g. intensity=zscore), cell by cell, with its tests."""

    condition: str  # '' when the sweep has a single condition
    metric: str
    rows: list[str]
    batch_sizes: list[int]
    cells: dict[tuple[str, int], Cell]
    bn_rows: list[str]  # rows whose runs report eval modes
    eval_modes: list[str]  # eval modes present anywhere, in display order
    seeds: list[int]
    best: dict[int, BestNorm]
    reference: str | None  # the row differences are taken to (None: not in this condition)
    deltas: list[Comparison]  # every row (and BN eval mode) minus the reference, one Holm family
    problems: list[tuple[Run, str, str]]  # (run, status, reason) for every run without a result
    notes: list[str] = field(default_factory=list)  # same seed twice in a cell, etc.

    @property
    def lower_is_better(self) -> bool:
        return self.metric in LOWER_IS_BETTER

    def cell(self, row: str, batch_size: int) -> Cell | None:
        return self.cells.get((row, batch_size))

    def delta(self, label: str, batch_size: int) -> Comparison | None:
        return next((d for d in self.deltas if d.label == label and d.batch_size == batch_size), None)


@dataclass
class Analysis:
    """The whole report: one Summary per condition, and BatchNorm's evaluation-mode gaps across all of them."""

    metric: str
    conditions: list[Summary]
    constant: str  # condition fields shared by every run, e.g. 'budget_unit=patches'
    gaps: list[GapTest]  # one Holm family over the whole report
    reference: str

    @property
    def problems(self) -> list[tuple[Run, str, str]]:
        return [p for s in self.conditions for p in s.problems]

    @property
    def notes(self) -> list[str]:
        return [n for s in self.conditions for n in s.notes]


def outcome(run: Run, metric: str) -> tuple[str, str | None]:
    """(status, reason). A 'completed' run with no finite metric counts as failed: it has no result."""
    if run.completed and run.value(metric) is None:
        return "failed", f"status completed but '{metric}' is missing or not finite"
    return run.status, run.error


def mode_label(row: str, mode: str) -> str:
    """'batch (batch stats)': the row of a BatchNorm evaluation mode."""
    return f"{row} ({EVAL_MODE_LABELS.get(mode, mode)})"


def _label_value(value: object) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(value.items())) or "default"
    return "?" if value is None else str(value)


def _row_labels(runs: list[Run]) -> dict[Run, str]:
    """norm, plus the variant fields that differ between runs of that norm.

    A field that a run lacks (an early failure records only the basics) does not count as a difference.
    """
    by_norm: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_norm[run.norm].append(run)
    labels = {}
    for norm, group in by_norm.items():
        present = {f: {repr(r.data[f]) for r in group if r.data.get(f) is not None} for f in VARIANT_FIELDS}
        varying = [f for f in VARIANT_FIELDS if len(present[f]) > 1]
        for run in group:
            extra = ", ".join(f"{f}={_label_value(run.data.get(f))}" for f in varying)
            labels[run] = f"{norm} [{extra}]" if extra else norm
    return labels


def _one_per_seed(runs: list[Run], notes: list[str]) -> list[Run]:
    """Different run_ids with the same seed in one cell are different configs; keep the newest completed."""
    by_seed: dict[int, list[Run]] = defaultdict(list)
    for run in runs:
        by_seed[run.seed].append(run)
    kept = []
    for seed, group in sorted(by_seed.items()):
        group.sort(key=lambda r: (r.completed, r.mtime, str(r.path)), reverse=True)
        kept.append(group[0])
        if len(group) > 1:
            notes.append(
                f"{group[0].norm} bs={group[0].batch_size} seed={seed}: {len(group)} runs with different "
                f"run_ids; kept {group[0].path}, ignored {', '.join(str(r.path) for r in group[1:])}"
            )
    return kept


def _mean_of(runs: list[Run], key: str) -> float | None:
    values = [v for v in (r.value(key) for r in runs) if v is not None]
    return mean(values) if values else None


def _intervals(values: dict[str, list[float]]) -> dict[str, Interval]:
    return {key: t_interval(v) for key, v in values.items() if v}


def _make_cell(row: str, runs: list[Run], metric: str, n_expected: int) -> Cell:
    good = [r for r in runs if outcome(r, metric)[0] == "completed"]
    by_seed = {r.seed: r.value(metric) for r in good}
    mode_by_seed: dict[str, dict[int, float]] = defaultdict(dict)
    modes_hd95: dict[str, list[float]] = defaultdict(list)
    for run in good:
        for mode, value in run.eval_modes.items():
            mode_by_seed[mode][run.seed] = value
        for mode, value in run.eval_modes_hd95.items():
            modes_hd95[mode].append(value)
    hd95 = [v for v in (r.value("val_hd95") for r in good) if v is not None]
    flags = [r.still_improving for r in good if r.still_improving is not None]
    return Cell(
        row=row,
        norm=runs[0].norm,
        batch_size=runs[0].batch_size,
        runs=runs,
        n_expected=max(n_expected, len(runs)),
        metric=t_interval(list(by_seed.values())) if by_seed else None,
        by_seed=by_seed,  # type: ignore[arg-type]
        eval_modes={m: t_interval(list(v.values())) for m, v in mode_by_seed.items()},
        mode_by_seed=dict(mode_by_seed),
        hd95=t_interval(hd95) if hd95 else None,
        eval_modes_hd95=_intervals(modes_hd95),
        still_improving=sum(flags),
        with_flag=len(flags),
        samples_per_s=_mean_of(good, "samples_per_s"),
        peak_memory_mb=_mean_of(good, "peak_memory_mb"),
        peak_cuda_memory_mb=_mean_of(good, "peak_cuda_memory_mb"),
        metric_key=metric,
    )


def _compare(label: str, against: str, bs: int, a: dict[int, float], b: dict[int, float]) -> Comparison:
    return Comparison(
        label=label,
        against=against,
        batch_size=bs,
        a_mean=mean(list(a.values())),
        b_mean=mean(list(b.values())),
        test=paired_t_test(a, b),
    )


def correct(comparisons: list[Comparison]) -> None:
    """Holm-adjust the p-values of one family in place (comparisons without a test stay None)."""
    tested = [c for c in comparisons if c.test is not None]
    for comparison, adjusted in zip(tested, holm([c.test.p_value for c in tested])):  # type: ignore[union-attr]
        comparison.p_holm = adjusted


def _best_at(bs: int, cells: list[Cell], lower_is_better: bool) -> BestNorm | None:
    ranked = sorted((c for c in cells if c.metric is not None), key=lambda c: c.metric.mean)  # type: ignore[union-attr]
    if not lower_is_better:
        ranked.reverse()
    if not ranked:
        return None
    first = ranked[0]
    best = BestNorm(batch_size=bs, leader=first.row, leader_mean=first.metric.mean)  # type: ignore[union-attr]
    best.comparisons = [_compare(first.row, c.row, bs, first.by_seed, c.by_seed) for c in ranked[1:]]
    correct(best.comparisons)
    return best


def _deltas(cells: dict[tuple[str, int], Cell], reference: str, modes: list[str]) -> list[Comparison]:
    """Every row (and BN evaluation mode) minus the reference row, at the same batch size and seed."""
    found = []
    for (row, bs), cell in sorted(cells.items()):
        ref = cells.get((reference, bs))
        if ref is None or not ref.by_seed:
            continue
        for mode in [None, *(m for m in modes if m in cell.mode_by_seed and m != "running")]:
            if (row == reference and mode is None) or not cell.values(mode):
                continue
            label = row if mode is None else mode_label(row, mode)
            found.append(_compare(label, reference, bs, cell.values(mode), ref.by_seed))
    correct(found)
    return found


def _mode_order(modes: set[str]) -> list[str]:
    known = [m for m in EVAL_MODE_LABELS if m in modes]
    return known + sorted(modes - set(known))


def _check_metric(collection: Collection, metric: str) -> None:
    completed = [r for r in collection.runs if r.completed]
    if not completed or any(r.value(metric) is not None for r in completed):
        return
    numeric = sorted({k for r in completed for k in r.data if r.value(k) is not None})
    raise UserError(f"metric '{metric}' not found in any completed run; numeric fields: {', '.join(numeric)}")


def summarize_condition(condition: str, runs: list[Run], metric: str, reference: str) -> Summary:
    """Cells, best norms and differences to the reference for the runs of one condition."""
    notes: list[str] = []
    labels = _row_labels(runs)
    grouped: dict[tuple[str, int], list[Run]] = defaultdict(list)
    for run in runs:
        grouped[(labels[run], run.batch_size)].append(run)
    seeds = sorted({r.seed for r in runs})
    cells = {
        key: _make_cell(key[0], _one_per_seed(group, notes), metric, len(seeds))
        for key, group in grouped.items()
    }
    rows = sorted({row for row, _ in cells})
    batch_sizes = sorted({bs for _, bs in cells})
    bn_rows = sorted({c.row for c in cells.values() if any(r.is_bn_family for r in c.runs)})
    modes = _mode_order({m for c in cells.values() for m in c.eval_modes})
    lower = metric in LOWER_IS_BETTER
    best = {}
    for bs in batch_sizes:
        found = _best_at(bs, [c for c in cells.values() if c.batch_size == bs], lower)
        if found is not None:
            best[bs] = found
    has_reference = reference in rows
    problems = []
    for cell in sorted(cells.values(), key=lambda c: (c.row, c.batch_size)):
        for run in cell.runs:
            status, reason = outcome(run, metric)
            if status != "completed":
                problems.append((run, status, reason or ""))
    return Summary(
        condition=condition,
        metric=metric,
        rows=rows,
        batch_sizes=batch_sizes,
        cells=cells,
        bn_rows=bn_rows,
        eval_modes=modes,
        seeds=seeds,
        best=best,
        reference=reference if has_reference else None,
        deltas=_deltas(cells, reference, modes) if has_reference else [],
        problems=problems,
        notes=notes,
    )


def _gaps(conditions: list[Summary]) -> list[GapTest]:
    """Batch statistics and PreciseBN against running statistics, for every BN row, batch size and
    condition: one Holm family, because together they answer one question (is eval mode fine?)."""
    found = []
    for summary in conditions:
        for row in summary.bn_rows:
            for bs in summary.batch_sizes:
                cell = summary.cell(row, bs)
                if cell is None or not cell.values("running"):
                    continue
                for mode in ("batch", "precise"):
                    if cell.values(mode):
                        comparison = _compare(
                            mode_label(row, mode),
                            mode_label(row, "running"),
                            bs,
                            cell.values(mode),
                            cell.values("running"),
                        )
                        found.append(GapTest(summary.condition, comparison))
    correct([g.comparison for g in found])
    return found


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


def analyze(collection: Collection, metric: str = "val_dice", reference: str = DEFAULT_REFERENCE) -> Analysis:
    """Split the runs by condition, summarize each, and test BatchNorm's evaluation gaps across all."""
    _check_metric(collection, metric)
    varying, constant = condition_fields(collection.runs)
    by_condition: dict[str, list[Run]] = defaultdict(list)
    for run in collection.runs:
        by_condition[run.condition(varying)].append(run)
    conditions = [summarize_condition(c, runs, metric, reference) for c, runs in sorted(by_condition.items())]
    return Analysis(metric, conditions, constant, _gaps(conditions), reference)
