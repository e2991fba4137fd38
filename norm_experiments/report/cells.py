"""Group the runs of one condition into (row, batch size) cells and summarize each over its seeds.

A row is a norm, split where its runs differ in anything but the seed: gradient accumulation
("batch [accumulate 4]"), a norm-level setting that varies between its runs (model, norm options), or a setting
that varies between the seeds of one cell (budget, learning rate, preprocessing, ...): such runs are not the
same experiment repeated, so they are never averaged.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace

from norm_experiments.report.collect import Run
from norm_experiments.report.model import Scores, paired
from norm_experiments.report.stats import Interval, mean, t_interval
from norm_experiments.run_record import NO_RESULT

# Norm-level settings: when one varies between the runs of a norm, it becomes part of the row label.
VARIANT_FIELDS = ("model", "patches_per_volume", "norm_options")
# Settings every seed of a cell must share (the seed is the only thing a cell repeats over). A field a run
# lacks (an early failure records only the basics) does not count as a difference.
CELL_FIELDS = (
    "samples_budget",
    "lr",
    "lr_scaling",
    "world_size",
    "global_batch",
    "effective_batch",
    "bn_batch",
    "amp",
    "batch_stats_windows",
    "patch_size",
    "preprocessing",
)

# Order in which run statuses are listed in a cell.
STATUS_ORDER = ("completed", "failed", "diverged", "interrupted", "stopped", "running")

EVAL_MODE_LABELS = {
    "running": "running stats",
    "precise": "precise BN",
    "batch": "batch stats",
    "batch_alone": "batch stats, 1 window",  # trainer.remedy_modes
    "precise_more": "precise BN, 4x patches",
}

# Metrics where a smaller value is better (a distance); every other metric: larger is better.
LOWER_IS_BETTER = frozenset({"val_hd95"})
# The per-case measure behind a metric (metrics without one are compared over seeds only).
CASE_MEASURES = {"val_dice": "dice", "val_hd95": "hd95"}


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
    scores: dict[str | None, Scores] = field(default_factory=dict)  # None: the metric; else an eval mode
    eval_modes: dict[str, Interval] = field(default_factory=dict)
    hd95: Interval | None = None
    eval_modes_hd95: dict[str, Interval] = field(default_factory=dict)
    still_improving: int = 0  # completed seeds whose convergence flag says still improving
    with_flag: int = 0  # completed seeds that recorded a convergence flag
    flag_metrics: tuple[str, ...] = ()  # what the flags were computed on
    samples_per_s: float | None = None
    peak_memory_mb: float | None = None
    peak_cuda_memory_mb: float | None = None

    @property
    def by_seed(self) -> dict[int, float]:
        return self.scores[None].by_seed

    def values(self, mode: str | None = None) -> Scores:
        """Scores of the cell's metric (mode None), or of one BatchNorm evaluation mode."""
        return self.scores.get(mode, Scores())

    def mode_intervals(self) -> dict[str, Interval]:
        """The cell's own metric in each BatchNorm evaluation mode: runs score Dice and HD95 in every mode, and
        no other metric ({} for those, so that no table shows a mode's Dice under another metric's name)."""
        return {"val_dice": self.eval_modes, "val_hd95": self.eval_modes_hd95}.get(self.metric_key, {})

    def interval(self, mode: str | None = None) -> Interval | None:
        return self.metric if mode is None else self.mode_intervals().get(mode)

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
    def status_summary(self) -> str:
        counts = self.status_counts
        parts = [f"{counts[s]} {s}" for s in STATUS_ORDER if counts.get(s)]
        parts += [f"{n} {s}" for s, n in sorted(counts.items()) if s not in STATUS_ORDER]
        if self.n_missing:
            parts.append(f"{self.n_missing} missing")
        return ", ".join(parts)


def outcome(run: Run, metric: str) -> tuple[str, str | None]:
    """(status, reason). A 'completed' run with no finite metric counts as failed: it has no result; a
    'running' one whose process has ended is 'stopped'."""
    if run.completed and run.value(metric) is None:
        return "failed", f"status completed but '{metric}' is missing or not finite"
    if run.gone:
        return "stopped", (
            f"its record says running, but {run.gone}, which held its folder, has ended (killed?); the same "
            "command continues it from its last checkpoint"
        )
    return run.status, run.error


def mode_label(row: str, mode: str) -> str:
    """'batch (batch stats)': the row of a BatchNorm evaluation mode."""
    return f"{row} ({EVAL_MODE_LABELS.get(mode, mode)})"


def _key(value: object) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _label_value(value: object) -> str:
    if isinstance(value, dict):
        text = ",".join(f"{k}={v}" for k, v in sorted(value.items())) or "default"
        # A long record (preprocessing) gets a short stable tag; the note names its values.
        return text if len(text) <= 40 else "#" + hashlib.sha1(_key(value).encode()).hexdigest()[:6]
    return "?" if value is None else str(value)


def _varying(runs: list[Run], fields: tuple[str, ...]) -> list[str]:
    present = {f: {_key(r.data[f]) for r in runs if r.data.get(f) is not None} for f in fields}
    return [f for f in fields if len(present[f]) > 1]


def _tagged(norm: str, tags: list[str]) -> str:
    return f"{norm} [{', '.join(tags)}]" if tags else norm


def row_labels(runs: list[Run], notes: list[str]) -> dict[Run, str]:
    """norm, plus accumulation, plus the fields that make its runs different experiments (see module doc)."""
    by_norm: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_norm[run.norm].append(run)
    tags: dict[Run, list[str]] = {}
    for group in by_norm.values():
        varying = _varying(group, VARIANT_FIELDS)
        for run in group:
            tags[run] = [f"accumulate {run.accumulate_steps}"] if run.accumulate_steps > 1 else []
            tags[run] += [f"{f}={_label_value(run.data.get(f))}" for f in varying]
    # Within one row and batch size, the seeds must share everything else.
    by_cell: dict[tuple[str, int], list[Run]] = defaultdict(list)
    for run in runs:
        by_cell[(_tagged(run.norm, tags[run]), run.batch_size)].append(run)
    for (row, bs), group in sorted(by_cell.items()):
        for name in _varying(group, CELL_FIELDS):
            values = sorted({_key(r.data[name]) for r in group if r.data.get(name) is not None})
            notes.append(
                f"{row} bs={bs}: runs differ in {name} ({'; '.join(values)}): split into rows, never averaged"
            )
            for run in group:
                tags[run].append(f"{name}={_label_value(run.data.get(name))}")
    return {run: _tagged(run.norm, tags[run]) for run in runs}


def one_per_seed(runs: list[Run], notes: list[str]) -> list[Run]:
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


def _scores(runs: list[Run], metric: str) -> dict[str | None, Scores]:
    """Per seed and per case: the metric (key None, scored with running statistics) and each eval mode."""
    found: dict[str | None, Scores] = defaultdict(Scores)
    measure = CASE_MEASURES.get(metric)
    for run in runs:
        found[None].by_seed[run.seed] = run.value(metric)  # type: ignore[assignment]
        cases = run.case_scores("running", measure) if measure else None
        if cases is not None:
            found[None].by_case[run.seed] = cases
        for mode, value in run.eval_modes.items():
            found[mode].by_seed[run.seed] = value
            cases = run.case_scores(mode, "dice")
            if cases is not None:
                found[mode].by_case[run.seed] = cases
    return dict(found)


def cell_interval(scores: Scores) -> Interval:
    """Mean and std over seeds, with the 95% interval of the cell mean: the half-width from the model the
    comparisons use (seeds x cases, model.paired), around the mean of the records' own values (for val_dice the
    model's mean is that mean; a mode's recorded mean can differ slightly from the mean of its per-case
    scores, and the interval must hold the value every table shows). The one interval of a cell that the
    tables, results.csv and the plots show."""
    seeds = t_interval(list(scores.by_seed.values()))
    found = paired(scores)
    if found is None or found.estimate is None:
        return seeds
    half = found.estimate.half_width(0.05)
    centre = seeds.mean
    return replace(
        seeds, half_width=half, low=centre - half, high=centre + half, method=found.estimate.method
    )


def make_cell(row: str, runs: list[Run], metric: str, n_expected: int) -> Cell:
    good = [r for r in runs if outcome(r, metric)[0] == "completed"]
    scores = _scores(good, metric)
    scores.setdefault(None, Scores())
    modes = {m: s for m, s in scores.items() if m is not None}
    modes_hd95: dict[str, list[float]] = defaultdict(list)
    for run in good:
        for mode, value in run.eval_modes_hd95.items():
            modes_hd95[mode].append(value)
    hd95 = [v for v in (r.value("val_hd95") for r in good) if v is not None]
    flags = [r for r in good if r.still_improving is not None]
    return Cell(
        row=row,
        norm=runs[0].norm,
        batch_size=runs[0].batch_size,
        runs=runs,
        n_expected=max(n_expected, len(runs)),
        metric_key=metric,
        metric=cell_interval(scores[None]) if scores[None].by_seed else None,
        scores=scores,
        eval_modes={m: cell_interval(s) for m, s in modes.items()},
        hd95=t_interval(hd95) if hd95 else None,
        eval_modes_hd95={m: t_interval(v) for m, v in modes_hd95.items() if v},
        still_improving=sum(1 for r in flags if r.still_improving),
        with_flag=len(flags),
        flag_metrics=tuple(sorted({r.convergence_metric or "not recorded" for r in flags})),
        samples_per_s=_mean_of(good, "samples_per_s"),
        peak_memory_mb=_mean_of(good, "peak_memory_mb"),
        peak_cuda_memory_mb=_mean_of(good, "peak_cuda_memory_mb"),
    )
