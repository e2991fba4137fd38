"""Markdown tables of a Summary. Every verdict printed here is the one its family decided (verdicts.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from norm_experiments.report.analysis import Summary
from norm_experiments.report.cells import Cell, mode_label
from norm_experiments.report.model import SEEDS_ONLY
from norm_experiments.report.stats import Interval
from norm_experiments.report.verdicts import Comparison, Family, Verdict

NO_DATA = "—"
SEEDS_ONLY_MARK = " §"  # this comparison had no per-case scores: paired t-test over seeds only
VERDICT_ORDER = (Verdict.BETTER, Verdict.EQUIVALENT, Verdict.INCONCLUSIVE, Verdict.WORSE, Verdict.UNTESTABLE)


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
    found = [(status, n) for status, n in cell.status_counts.items() if status != "completed"]
    if cell.n_missing:
        found.append(("missing", cell.n_missing))
    return found


def _still_improving(cell: Cell) -> str:
    """' †2/3': 2 of the 3 seeds with a convergence flag were still improving at the end."""
    return f" †{cell.still_improving}/{cell.with_flag}" if cell.still_improving else ""


def format_metric_cell(cell: Cell | None) -> str:
    if cell is None:
        return NO_DATA
    unfinished = _unfinished(cell)
    if cell.metric is None:
        return ", ".join(f"{status} ({n}/{cell.n_expected})" for status, n in unfinished)
    notes = [f"{n} {status}" for status, n in unfinished if status != "missing"]
    return format_interval(cell.metric, cell.n_expected, notes) + _still_improving(cell)


def format_mode_cell(cell: Cell | None, mode: str) -> str:
    """The cell's metric in one BatchNorm evaluation mode (Cell.mode_intervals)."""
    found = None if cell is None else cell.mode_intervals().get(mode)
    return NO_DATA if found is None else format_interval(found, cell.n_expected)


def format_difference(comparison: Comparison | None, verdict: bool = True) -> str:
    """'+0.012 [-0.030, +0.054] inconclusive' (the family-adjusted interval); § marks a seeds-only test."""
    if comparison is None:
        return NO_DATA
    if comparison.estimate is None or comparison.low is None or comparison.high is None:
        seeds = f"{comparison.n_seeds} shared seed{'s' if comparison.n_seeds != 1 else ''}"
        return f"{comparison.difference:+.3f} (untestable: {seeds})"
    mark = SEEDS_ONLY_MARK if comparison.estimate.method == SEEDS_ONLY else ""
    text = f"{comparison.difference:+.3f} [{comparison.low:+.3f}, {comparison.high:+.3f}]"
    return text + (f" {verdict_word(comparison.verdict)}" if verdict else "") + mark


def verdict_word(verdict: Verdict, margin: float | None = None) -> str:
    if verdict is Verdict.EQUIVALENT and margin is not None:
        return f"equivalent within ±{margin:g}"
    return verdict.value


def mode_rows(summary: Summary, values: Callable[[Cell], dict[str, Interval]]) -> list[tuple[str, str, str]]:
    """(label, row, mode) for the extra eval-mode rows of BN-family norms: the modes `values` has for some
    cell of the row. The norm's own row is scored with running statistics, so a 'running' row would repeat it."""
    modes = [m for m in summary.eval_modes if m != "running"]
    found = []
    for row in summary.bn_rows:
        for mode in modes:
            if any(mode in values(c) for c in summary.cells.values() if c.row == row):
                found.append((mode_label(row, mode), row, mode))
    return found


def _ordered_rows(
    summary: Summary, values: Callable[[Cell], dict[str, Interval]]
) -> list[tuple[str, str, str | None]]:
    """(label, row, mode) in display order: each norm, then its eval-mode rows directly below it."""
    extra = mode_rows(summary, values)
    ordered = []
    for row in summary.rows:
        ordered.append((row, row, None))
        ordered += [item for item in extra if item[1] == row]
    return ordered


def _header(summary: Summary, first: str) -> list[str]:
    return [first] + [f"bs {bs}" for bs in summary.batch_sizes]


# ---------------------------------------------------------------- markdown tables


def metric_table(summary: Summary) -> str:
    """Rows = norms (+ eval-mode rows), columns = batch sizes, cells = mean ± std (†k/n: k of n seeds still
    improving). Descriptive: no row ranks the norms (only verdicts compare them)."""
    rows = []
    for label, row, mode in _ordered_rows(summary, Cell.mode_intervals):
        cells = [summary.cell(row, bs) for bs in summary.batch_sizes]
        if mode is None:
            rows.append([label] + [format_metric_cell(c) for c in cells])
        else:
            rows.append([label] + [format_mode_cell(c, mode) for c in cells])
    return markdown_table(_header(summary, "norm"), rows)


def hd95_table(summary: Summary) -> str:
    """HD95 in mm (mean ± std over seeds), final evaluation and each BatchNorm evaluation mode."""
    rows = []
    for label, row, mode in _ordered_rows(summary, lambda cell: cell.eval_modes_hd95):
        cells = [summary.cell(row, bs) for bs in summary.batch_sizes]
        if mode is None:
            found = [c.hd95 if c else None for c in cells]
        else:
            found = [c.eval_modes_hd95.get(mode) if c else None for c in cells]
        rows.append(
            [label] + [NO_DATA if iv is None else format_interval(iv, iv.n, digits=1) for iv in found]
        )
    return markdown_table(_header(summary, "norm"), rows)


def delta_table(summary: Summary) -> str:
    """Each row minus the reference norm at the same batch size and seed, with its verdict."""
    labels = [row for row in summary.rows if row != summary.reference]
    rows = [
        [label] + [format_difference(summary.delta(label, bs)) for bs in summary.batch_sizes]
        for label in labels
    ]
    return markdown_table(_header(summary, f"minus {summary.reference}"), rows)


def best_table(summary: Summary) -> str:
    """Per batch size: every row sorted by its verdict against the reference (the same verdicts as the
    difference table: no test of its own)."""
    margin = summary.deltas.margin
    header = ["batch size"] + [f"{verdict_word(v, margin)} vs {summary.reference}" for v in VERDICT_ORDER]
    rows = []
    for bs in summary.batch_sizes:
        by_verdict = {
            v: [c.label for c in summary.deltas.comparisons if c.batch_size == bs and c.verdict is v]
            for v in VERDICT_ORDER
        }
        rows.append([str(bs)] + [", ".join(by_verdict[v]) or NO_DATA for v in VERDICT_ORDER])
    return markdown_table(header, rows, align="r" + "l" * len(VERDICT_ORDER))


def gap_table(family: Family) -> str:
    """BatchNorm's evaluation-mode gaps of one condition: batch statistics and PreciseBN minus running."""
    header = [
        "norm",
        "batch size",
        "compared",
        "mean",
        "running",
        "difference [interval]",
        "p (Bonferroni)",
        "verdict",
    ]
    rows = []
    for c in family.comparisons:
        norm = c.label.split(" (")[0]
        mode = c.label[len(norm) + 2 : -1]
        p = NO_DATA if c.p_adjusted is None else format_p(c.p_adjusted)
        rows.append(
            [
                norm,
                str(c.batch_size),
                mode,
                f"{c.a_mean:.3f}",
                f"{c.b_mean:.3f}",
                format_difference(c, verdict=False),
            ]
            + [p, verdict_word(c.verdict, family.margin)]
        )
    return markdown_table(header, rows, align="lrlrrrrl")


def remedy_table(family: Family, digits: int = 3) -> str:
    """A remedy minus the same runs without it, per row and batch size, with the family's verdicts."""
    header = [
        "norm",
        "batch size",
        "with the remedy",
        "without",
        "difference [interval]",
        "p (Bonferroni)",
        "verdict",
    ]
    rows = []
    for c in family.comparisons:
        p = NO_DATA if c.p_adjusted is None else format_p(c.p_adjusted)
        rows.append(
            [
                c.against,
                str(c.batch_size),
                f"{c.a_mean:.{digits}f}",
                f"{c.b_mean:.{digits}f}",
                format_difference(c, verdict=False),
                p,
                verdict_word(c.verdict, family.margin),
            ]
        )
    return markdown_table(header, rows, align="lrrrrrl")


def error_table(rows: list[tuple[str, int, dict[str, float], float | None]]) -> str:
    """Where the errors are: means over seeds of the per-case means (report/errors.py)."""
    from norm_experiments.report.errors import COLUMNS

    header = ["norm", "batch size", "HD95 mm"] + [title for _, title in COLUMNS]
    body = []
    for label, bs, found, hd95 in rows:
        cells = [f"{found[f]:.0f}" if f == "fp_components" else f"{found[f]:.2f}" for f, _ in COLUMNS]
        body.append([label, str(bs), NO_DATA if hd95 is None else f"{hd95:.1f}", *cells])
    return markdown_table(header, body, align="lr" + "r" * (1 + len(COLUMNS)))


def convergence_table(summary: Summary) -> str:
    """Per cell: how many seeds were still improving at the end, and what the flag was computed on."""
    rows = []
    for row in summary.rows:
        cells = [summary.cell(row, bs) for bs in summary.batch_sizes]
        counts = [
            NO_DATA if c is None or not c.with_flag else f"{c.still_improving}/{c.with_flag}" for c in cells
        ]
        metrics = sorted({m for c in cells if c is not None for m in c.flag_metrics})
        rows.append([row] + counts + [", ".join(metrics) or NO_DATA])
    header = _header(summary, "still improving") + ["flag computed on"]
    return markdown_table(header, rows, align="l" + "r" * len(summary.batch_sizes) + "l")


def format_ci(cell: Cell | None, mode: str | None) -> str:
    """The cell mean's 95% interval (cells.cell_interval: the model the comparisons use; §: seeds only), the
    same numbers as results.csv and the plots' error bars."""
    interval = cell.interval(mode) if cell is not None else None
    if interval is None:
        return NO_DATA
    if not interval.has_spread and interval.method == SEEDS_ONLY:
        return f"{interval.mean:.3f} (n=1, no interval)"
    mark = SEEDS_ONLY_MARK if interval.method == SEEDS_ONLY else ""
    return f"{interval.mean:.3f} [{interval.low:.3f}, {interval.high:.3f}]{mark}"


def ci_table(summary: Summary) -> str:
    rows = []
    for label, row, mode in _ordered_rows(summary, Cell.mode_intervals):
        rows.append([label] + [format_ci(summary.cell(row, bs), mode) for bs in summary.batch_sizes])
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
