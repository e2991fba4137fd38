"""Group runs into (norm, batch size) cells and summarize each over seeds."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from norm_experiments.errors import UserError
from norm_experiments.report.collect import FAILED_STATUSES, Collection, Run
from norm_experiments.report.stats import Interval, PairedTest, mean, paired_t_test, t_interval

# Config fields that are not table axes but must not be averaged together when they differ between runs
# of one norm (e.g. two merged sweeps with different models, or GroupNorm with 8 and 16 groups). When one
# varies, it becomes part of the row label: "group [norm_options=groups=8]".
VARIANT_FIELDS = ("model", "patches_per_volume", "norm_options")

# Order in which run statuses are listed in a cell.
STATUS_ORDER = ("completed", "failed", "diverged", "interrupted", "running")

EVAL_MODE_LABELS = {"running": "running stats", "precise": "precise BN", "batch": "batch stats"}


@dataclass
class Cell:
    """All runs of one row (a norm, possibly with a variant) at one batch size."""

    row: str
    norm: str
    batch_size: int
    runs: list[Run]
    n_expected: int  # seeds expected in every cell: the union of seeds seen anywhere in the sweep
    metric_key: str  # the field summarized (val_dice unless --metric says otherwise)
    metric: Interval | None  # over completed runs with a finite metric value
    by_seed: dict[int, float]  # metric value per completed seed, for paired tests
    eval_modes: dict[str, Interval] = field(default_factory=dict)
    samples_per_s: float | None = None
    peak_memory_mb: float | None = None
    peak_cuda_memory_mb: float | None = None

    @property
    def n_completed(self) -> int:
        return len(self.by_seed)

    @property
    def status_counts(self) -> Counter:
        return Counter(outcome(r, self.metric_key)[0] for r in self.runs)

    @property
    def n_failed(self) -> int:
        counts = self.status_counts
        return sum(counts[s] for s in FAILED_STATUSES)

    @property
    def n_missing(self) -> int:
        return max(0, self.n_expected - len(self.runs))

    @property
    def status_summary(self) -> str:
        counts = self.status_counts
        parts = [f"{counts[s]} {s}" for s in STATUS_ORDER if counts.get(s)]
        parts += [f"{n} {s}" for s, n in sorted(counts.items()) if s not in STATUS_ORDER]
        if self.n_missing:
            parts.append(f"{self.n_missing} missing")
        return ", ".join(parts)


@dataclass
class BestNorm:
    """The leading row at one batch size and whether its lead over the runner-up exceeds seed noise."""

    batch_size: int
    leader: str
    leader_mean: float
    runner_up: str | None = None
    runner_up_mean: float | None = None
    test: PairedTest | None = None  # None: fewer than 2 shared seeds (or no runner-up)

    @property
    def significant(self) -> bool | None:
        return None if self.test is None else self.test.p_value < 0.05


@dataclass
class Summary:
    """The whole sweep, cell by cell."""

    metric: str
    rows: list[str]
    batch_sizes: list[int]
    cells: dict[tuple[str, int], Cell]
    bn_rows: list[str]  # rows whose runs report eval modes
    eval_modes: list[str]  # eval modes present anywhere, in display order
    best: dict[int, BestNorm]
    problems: list[tuple[Run, str, str]]  # (run, status, reason) for every run without a result
    notes: list[str] = field(default_factory=list)  # same seed twice in a cell, etc.

    def cell(self, row: str, batch_size: int) -> Cell | None:
        return self.cells.get((row, batch_size))


def outcome(run: Run, metric: str) -> tuple[str, str | None]:
    """(status, reason). A 'completed' run with no finite metric counts as failed: it has no result."""
    if run.completed and run.value(metric) is None:
        return "failed", f"status completed but '{metric}' is missing or not finite"
    return run.status, run.error


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


def _make_cell(row: str, runs: list[Run], metric: str, n_expected: int) -> Cell:
    good = [r for r in runs if outcome(r, metric)[0] == "completed"]
    by_seed = {r.seed: r.value(metric) for r in good}
    modes: dict[str, list[float]] = defaultdict(list)
    for run in good:
        for mode, value in run.eval_modes.items():
            modes[mode].append(value)
    return Cell(
        row=row,
        norm=runs[0].norm,
        batch_size=runs[0].batch_size,
        runs=runs,
        n_expected=max(n_expected, len(runs)),
        metric=t_interval(list(by_seed.values())) if by_seed else None,
        by_seed=by_seed,
        eval_modes={m: t_interval(v) for m, v in modes.items()},
        samples_per_s=_mean_of(good, "samples_per_s"),
        peak_memory_mb=_mean_of(good, "peak_memory_mb"),
        peak_cuda_memory_mb=_mean_of(good, "peak_cuda_memory_mb"),
        metric_key=metric,
    )


def _best_at(batch_size: int, cells: list[Cell]) -> BestNorm | None:
    ranked = sorted((c for c in cells if c.metric is not None), key=lambda c: c.metric.mean, reverse=True)
    if not ranked:
        return None
    first = ranked[0]
    best = BestNorm(batch_size=batch_size, leader=first.row, leader_mean=first.metric.mean)
    if len(ranked) > 1:
        second = ranked[1]
        best.runner_up, best.runner_up_mean = second.row, second.metric.mean
        best.test = paired_t_test(first.by_seed, second.by_seed)
    return best


def _mode_order(modes: set[str]) -> list[str]:
    known = [m for m in EVAL_MODE_LABELS if m in modes]
    return known + sorted(modes - set(known))


def _check_metric(collection: Collection, metric: str) -> None:
    completed = [r for r in collection.runs if r.completed]
    if not completed or any(r.value(metric) is not None for r in completed):
        return
    numeric = sorted({k for r in completed for k in r.data if r.value(k) is not None})
    raise UserError(f"metric '{metric}' not found in any completed run; numeric fields: {', '.join(numeric)}")


def summarize(collection: Collection, metric: str = "val_dice") -> Summary:
    """Group the collected runs into cells and compute per-cell statistics and the best row per batch size."""
    _check_metric(collection, metric)
    notes: list[str] = []
    labels = _row_labels(collection.runs)
    grouped: dict[tuple[str, int], list[Run]] = defaultdict(list)
    for run in collection.runs:
        grouped[(labels[run], run.batch_size)].append(run)
    n_expected = len({r.seed for r in collection.runs})

    cells = {}
    for (row, bs), runs in grouped.items():
        cells[(row, bs)] = _make_cell(row, _one_per_seed(runs, notes), metric, n_expected)
    rows = sorted({row for row, _ in cells})
    batch_sizes = sorted({bs for _, bs in cells})
    bn_rows = sorted({c.row for c in cells.values() if any(r.is_bn_family for r in c.runs)})
    modes = _mode_order({m for c in cells.values() for m in c.eval_modes})

    best = {}
    for bs in batch_sizes:
        found = _best_at(bs, [c for c in cells.values() if c.batch_size == bs])
        if found is not None:
            best[bs] = found

    problems = []
    for cell in sorted(cells.values(), key=lambda c: (c.row, c.batch_size)):
        for run in cell.runs:
            status, reason = outcome(run, metric)
            if status != "completed":
                problems.append((run, status, reason or ""))
    return Summary(
        metric=metric,
        rows=rows,
        batch_sizes=batch_sizes,
        cells=cells,
        bn_rows=bn_rows,
        eval_modes=modes,
        best=best,
        problems=problems,
        notes=notes,
    )
