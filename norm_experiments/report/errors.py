"""Where each cell's errors are (descriptive), and the largest-component remedy as a family with verdicts.

The records' per-case `errors` (training/error_locations.py) say how much false foreground a final
evaluation predicted, how much of it lies more than 10 mm from the true foreground, outside the head, and in
windows that held little but air. The `running_lcc` scores are the same predictions after keeping each
class's largest connected component (nnU-Net's post-processing). The remedy is tested per row and batch size,
on Dice and on HD95, each a family of its own (exploratory, Bonferroni within the family).
"""

from __future__ import annotations

import math

from norm_experiments.report.cells import EVAL_MODE_LABELS, Cell, outcome
from norm_experiments.report.questions import Side, side_scores
from norm_experiments.report.verdicts import DEFAULT_MARGIN, HD95_MARGIN, Family, compare

# (field, column title) of the error table, in the order shown.
COLUMNS = (
    ("fp_ml", "false fg mL"),
    ("fp_far_ml", "> 10 mm from truth, mL"),
    ("fp_air_ml", "outside the head, mL"),
    ("fp_air_window_ml", "in air windows, mL"),
    ("fp_components", "false fg pieces"),
    ("fn_ml", "missed fg mL"),
)
MODES = ("running", "batch", "precise", "batch_alone", "precise_more")


def mean_errors(cell: Cell, mode: str) -> dict[str, float] | None:
    """Each field's mean over the cell's completed seeds of the mean over cases (None: no record has it)."""
    per_seed: list[dict[str, float]] = []
    for run in cell.runs:
        if outcome(run, "val_dice")[0] != "completed":
            continue
        cases = run.case_errors(mode)
        if cases:
            per_seed.append(
                {f: math.fsum(c.get(f, 0.0) for c in cases.values()) / len(cases) for f, _ in COLUMNS}
            )
    if not per_seed:
        return None
    return {f: math.fsum(s[f] for s in per_seed) / len(per_seed) for f, _ in COLUMNS}


def error_rows(cells: dict[tuple[str, int], Cell]) -> list[tuple[str, int, dict[str, float], float | None]]:
    """(row label, batch size, mean errors, mean HD95) for every cell and evaluation mode with records."""
    rows = []
    for (row, bs), cell in sorted(cells.items()):
        for mode in MODES:
            found = mean_errors(cell, mode)
            if found is None:
                continue
            label = row if mode == "running" else f"{row} ({EVAL_MODE_LABELS[mode]})"
            hd95 = cell.hd95 if mode == "running" else cell.eval_modes_hd95.get(mode)
            rows.append((label, bs, found, hd95.mean if hd95 else None))
    return rows


def lcc_families(
    cells: dict[tuple[str, int], Cell], condition: str, margin: float = DEFAULT_MARGIN
) -> tuple[Family, Family]:
    """Largest component minus as predicted, per row and batch size: one family on Dice, one on HD95."""
    dice = Family("largest component, Dice", condition, margin=margin)
    hd95 = Family("largest component, HD95", condition, margin=HD95_MARGIN, lower_is_better=True)
    for (row, bs), cell in sorted(cells.items()):
        for metric, family in (("val_dice", dice), ("val_hd95", hd95)):
            kept = side_scores(cell, Side(row, bs, "model_lcc"), metric)
            plain = side_scores(cell, Side(row, bs, "model"), metric)
            if kept.by_seed and plain.by_seed:
                family.comparisons.append(compare(f"{row} + largest component", row, bs, kept, plain))
    return dice.decide(), hd95.decide()
