"""How sure norm-exp-check can be about one trained model, and the verdict it prints: each validation case's Dice under the three
evaluation modes, the paired gap of PreciseBN and of batch statistics over the running statistics with an
interval over cases, and a verdict in the report's terms (better / worse / equivalent within ±margin /
inconclusive / untestable; report/verdicts.py).

The interval is a paired t-interval over validation cases (df = cases - 1): it says how much the gap could
differ on other cases like these for this trained model, not for another training of it (the report's seeds).
The two comparisons answer one question and form one family, Bonferroni-corrected as the report's families are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from norm_experiments.diagnose.scoring import Checked
from norm_experiments.report.model import Estimate, case_estimate
from norm_experiments.report.stats import mean, t_quantile
from norm_experiments.report.verdicts import (  # the report's verdicts, for one model
    POWER,
    Comparison,
    Family,
    Verdict,
    confirmable_margin,
    detectable_difference,
)
from norm_experiments.training.evaluate import ValResult, case_mean_dice

MODE_NAMES = {
    "running": "running statistics (model.eval())",
    "precise": "PreciseBN statistics",
    "batch": "batch statistics",
    "plain": "eval mode",
    "own": "each window's own statistics (as in training)",
}
SHORT_NAMES = {
    "running": "running",
    "precise": "PreciseBN",
    "batch": "batch stats",
    "plain": "eval mode",
    "own": "own statistics",
}
GAP_MODES = ("precise", "batch")  # each compared with "running" (model.eval())
MAX_CASES_SUGGESTED = 10_000


def case_means(result: ValResult) -> dict[str, float]:
    """Each case's Dice, averaged over the foreground classes the case holds (a case holding none says nothing
    and is left out)."""
    if result.case_totals is None:
        return {}
    dice = {}
    for name, totals in zip(result.case_names, result.case_totals):
        mean = case_mean_dice(totals)
        if mean is not None:
            dice[name] = mean
    return dice


@dataclass
class CaseGaps:
    """Per-case Dice of each mode and the family of gaps over the running statistics."""

    dice: dict[str, dict[str, float]]  # mode -> case -> Dice
    cases: list[str]  # the cases scored in every mode
    family: Family

    def gap(self, mode: str) -> Comparison:
        return next(c for c in self.family.comparisons if c.label == mode)

    def verdicts(self) -> dict[str, Verdict]:
        return {c.label: c.verdict for c in self.family.comparisons}


def compare_modes(
    scores: dict[str, ValResult], margin: float, modes: tuple[str, ...] = GAP_MODES
) -> CaseGaps:
    """Each of `modes` (PreciseBN and batch statistics) minus running, per case, decided as one family."""
    dice = {mode: case_means(result) for mode, result in scores.items()}
    cases = sorted(set.intersection(*(set(d) for d in dice.values())))
    family = Family("check", "", margin=margin)
    for mode in modes:
        diffs = [dice[mode][c] - dice["running"][c] for c in cases]
        a = [dice[mode][c] for c in cases]
        b = [dice["running"][c] for c in cases]
        family.comparisons.append(
            Comparison(mode, "running", 0, _mean(a), _mean(b), case_estimate(diffs), n_seeds=1)
        )
    return CaseGaps(dice, cases, family.decide())


def _mean(values: list[float]) -> float:
    return mean(values) if values else math.nan  # no case scored in every mode: no mean


def cases_to_confirm(
    estimate: Estimate, alpha_each: float, margin: float, power: float = POWER
) -> int | None:
    """About how many cases, with this spread of per-case gaps, would show equivalence within ±margin with
    `power` when the true gap is 0 (None: more than MAX_CASES_SUGGESTED, or no spread to go on)."""
    return _cases_needed(estimate, alpha_each, (1 + power) / 2, margin)


def cases_to_detect(estimate: Estimate, alpha_each: float, gap: float, power: float = POWER) -> int | None:
    """About how many cases, with this spread of per-case gaps, would find a true gap of `gap` with `power`."""
    return _cases_needed(estimate, alpha_each, power, abs(gap))


def _cases_needed(estimate: Estimate, alpha_each: float, quantile: float, target: float) -> int | None:
    """The smallest n with (t_{1-alpha'/2, n-1} + t_{quantile, n-1}) * sd / sqrt(n) < target."""
    sd = estimate.se * math.sqrt(estimate.n_cases)
    if sd == 0.0 or target <= 0.0:
        return None

    def enough(n: int) -> bool:
        return (t_quantile(1 - alpha_each / 2, n - 1) + t_quantile(quantile, n - 1)) * sd / math.sqrt(
            n
        ) < target

    if enough(2):
        return 2
    high = 4
    while not enough(high):  # `enough` only turns true as n grows: double past it, then bisect
        if high >= MAX_CASES_SUGGESTED:
            return None
        high *= 2
    low = high // 2  # not enough
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if enough(middle) else (middle, high)
    return high


# ------------------------------------------------------------------------------------------ sentences


def interval(c: Comparison) -> str:
    return "no interval" if c.low is None else f"[{c.low:+.3f}, {c.high:+.3f}]"


def power_line(gaps: CaseGaps) -> str | None:
    """What this many cases can show, at the spread the gaps had (the larger of the two comparisons)."""
    tested = gaps.family.tested
    if not tested:
        return None
    alpha = gaps.family.alpha_each
    detect = max(detectable_difference(c.estimate, alpha) for c in tested)  # type: ignore[arg-type]
    confirm = max(confirmable_margin(c.estimate, alpha) for c in tested)  # type: ignore[arg-type]
    n = len(gaps.cases)
    if detect >= 1:  # a Dice difference lies within ±1: no gap there is can be found with this many cases
        return (
            f"What {n} cases can show: nothing; no gap a Dice can have (at most 1) is found with 80% power at this "
            "spread. Score more validation cases (data.val_cases or data.val_fraction), better 10 or more."
        )
    equivalence = (
        f"equivalence within ±{confirm:.3f} is shown with 80% power when there is no gap"
        if confirm < 1
        else "no equivalence margin below 1 can be shown"
    )
    return f"What {n} cases can show: a true gap of {detect:.3f} Dice is found with 80% power, and {equivalence}."


def verdict(checked: Checked, gaps: CaseGaps, repaired: str | None) -> list[str]:
    """Plain sentences whose claims follow from the tables above; `repaired` says what happened to the
    repaired weights (written, not written, or how to write them)."""
    dice = {mode: result.dice_mean for mode, result in checked.scores.items()}
    lines = [
        f"On {len(gaps.cases)} validation cases: Dice {dice['running']:.3f} in eval mode (running statistics), "
        f"{dice['precise']:.3f} with PreciseBN statistics, {dice['batch']:.3f} with batch statistics."
    ]
    verdicts = gaps.verdicts()
    if Verdict.UNTESTABLE in verdicts.values():
        lines.append(
            f"{len(gaps.cases)} scored case(s) give no interval, so no verdict: score at least 2 validation cases "
            "(data.val_cases or data.val_fraction), better 10 or more."
        )
    elif Verdict.BETTER in verdicts.values():
        lines += loss_lines(checked, gaps)
    elif all(v == Verdict.EQUIVALENT for v in verdicts.values()):
        lines.append(
            f"Eval mode is equivalent within ±{gaps.family.margin} Dice to PreciseBN and to batch statistics "
            f"(intervals {interval(gaps.gap('precise'))} and {interval(gaps.gap('batch'))}): your model is fine "
            "in model.eval() on this data."
        )
    elif all(v in (Verdict.EQUIVALENT, Verdict.WORSE) for v in verdicts.values()):
        words = ", ".join(f"{SHORT_NAMES[m]} {v.value}" for m, v in verdicts.items())
        lines.append(
            f"No other evaluation scores better than eval mode ({words}): your model is fine in model.eval() "
            "on this data."
        )
    else:
        lines += inconclusive_lines(gaps)
    lines.append(fit_sentence(checked))
    line = power_line(gaps)
    return lines + ([line] if line else []) + ([repaired] if repaired else [])


def instance_verdict(checked: Checked, gaps: CaseGaps) -> list[str]:
    """The verdict for a network whose InstanceNorm layers keep running statistics (no BatchNorm): does
    model.eval() lose against each window's own statistics, which is how training normalized?"""
    dice = {mode: result.dice_mean for mode, result in checked.scores.items()}
    own = gaps.gap("own")
    layers = len(checked.instance_layers)
    lines = [
        f"No BatchNorm layer in this network, but {layers} InstanceNorm layer(s) keep running statistics "
        "(track_running_stats=true), and model.eval() normalizes with those averages instead of each window's "
        f"own statistics. On {len(gaps.cases)} validation cases: Dice {dice['running']:.3f} in eval mode, "
        f"{dice['own']:.3f} with each window's own statistics; own minus eval mode {own.difference:+.3f} "
        f"{interval(own)}: {own.verdict.value}."
    ]
    if own.verdict == Verdict.UNTESTABLE:
        lines.append("Score at least 2 validation cases (data.val_cases or data.val_fraction) for a verdict.")
    elif own.verdict == Verdict.BETTER:
        lines.append(
            "Eval mode LOSES accuracy. The same weights score the own-statistics row when those layers normalize "
            "each window by itself at inference: set track_running_stats=False on them (or load the weights "
            "without their running_mean and running_var into a network built without running statistics); "
            "nothing needs retraining."
        )
    elif own.verdict == Verdict.EQUIVALENT:
        lines.append(
            f"Eval mode is equivalent to each window's own statistics within ±{gaps.family.margin} Dice: fine in "
            "model.eval() on this data."
        )
    elif own.verdict == Verdict.WORSE:
        lines.append(
            "Eval mode scores higher than each window's own statistics: fine in model.eval() on this data."
        )
    else:
        lines.append(
            "Neither is shown better or equivalent on these cases (inconclusive): score more validation cases "
            "for a verdict."
        )
    line = power_line(gaps)
    return lines + ([line] if line else [])


def loss_lines(checked: Checked, gaps: CaseGaps) -> list[str]:
    precise, batch = gaps.gap("precise"), gaps.gap("batch")
    best = max((c for c in (precise, batch) if c.verdict == Verdict.BETTER), key=lambda c: c.difference)
    hd95 = {mode: result.hd95_mean for mode, result in checked.scores.items()}
    hd_change = ""
    if hd95["running"] is not None and hd95[best.label] is not None:
        hd_change = f"; HD95 {hd95['running']:.1f} mm against {hd95[best.label]:.1f} mm"
    lines = [
        f"Eval mode LOSES accuracy: {MODE_NAMES[best.label]} score {best.difference:+.3f} Dice "
        f"{interval(best)} above the running statistics{hd_change}."
    ]
    retrain = (
        "For a model without this gap, retrain with a batch-independent norm: GroupNorm or InstanceNorm (MONAI: "
        'norm="instance" or ("group", {"num_groups": 8}); here: norm-exp-train norm=group).'
    )
    batch_fix = (
        'run your inference inside norm_experiments.norms.bn_eval_mode(model, "batch"), batching windows as '
        "here (" + windows_sentence(checked) + ")"
    )
    margin = gaps.family.margin
    if precise.verdict == Verdict.BETTER and precise.a_mean >= batch.a_mean - margin:
        lines.append(
            f"PreciseBN repairs it: recomputed statistics score {precise.a_mean:.3f} in plain model.eval() "
            f"({precise.difference:+.3f} {interval(precise)})."
        )
    elif precise.verdict == Verdict.BETTER:
        share = precise.difference / batch.difference
        lines.append(
            f"PreciseBN repairs part of it ({precise.a_mean:.3f}, {precise.difference:+.3f} {interval(precise)}: "
            f"about {share:.0%} of what batch statistics gain); to get {batch.a_mean:.3f}, {batch_fix}. {retrain}"
        )
    else:
        lines.append(
            f"PreciseBN is not shown to repair it ({precise.verdict.value}: {precise.difference:+.3f} "
            f"{interval(precise)}): one set of statistics, even recomputed over training patches, does not fit "
            f"volumes whose statistics differ as table 4 shows. Batch statistics do ({batch.a_mean:.3f}): "
            f"{batch_fix}. {retrain}"
        )
    return lines


def inconclusive_lines(gaps: CaseGaps) -> list[str]:
    open_gaps = [c for c in gaps.family.comparisons if c.verdict == Verdict.INCONCLUSIVE]
    spans = "; ".join(f"{SHORT_NAMES[c.label]} − running {interval(c)}" for c in open_gaps)
    margin = gaps.family.margin
    lines = [
        f"Inconclusive: on these {len(gaps.cases)} cases, {spans}: neither a loss in eval mode nor equivalence "
        f"within ±{margin} Dice is shown, so this check cannot say your model is fine in model.eval()."
    ]
    for c in open_gaps:
        if abs(c.difference) > margin:
            n = cases_to_detect(c.estimate, gaps.family.alpha_each, c.difference)
            goal = f"find a gap of {c.difference:+.3f} (if that is the true gap)"
        else:
            n = cases_to_confirm(c.estimate, gaps.family.alpha_each, margin)
            goal = f"show equivalence within ±{margin} (if there is no gap)"
        if n is not None:
            lines.append(
                f"{SHORT_NAMES[c.label]} − running: with this spread between cases, about {n} validation cases "
                f"would {goal} with 80% power (data.val_cases or data.val_fraction)."
            )
    return lines


def fit_sentence(checked: Checked) -> str:
    layer = worst_layer(checked)
    rows = checked.layer_gaps[layer]
    volume = max(rows, key=lambda v: rows[v]["mean_gap"])
    var_layer = max(checked.layer_gaps, key=lambda n: mean_of(checked.layer_gaps[n], "var_gap"))
    var_rows = checked.layer_gaps[var_layer]
    var_volume = max(var_rows, key=lambda v: var_rows[v]["var_gap"])
    return (
        f"The running statistics sit up to {rows[volume]['mean_gap']:.2f}σ from a validation volume's mean "
        f"({volume}, at {layer}; {mean_of(rows, 'mean_gap'):.2f}σ on average over volumes), and the running "
        f"variance is off from a volume's by up to {var_rows[var_volume]['var_gap']:.2f} times itself "
        f"({var_volume}, at {var_layer}; {mean_of(var_rows, 'var_gap'):.2f} on average over volumes)."
    )


def windows_sentence(checked: Checked) -> str:
    """What "batch statistics" meant here: how many windows each forward normalized together."""
    w = checked.windows
    sizes = ", ".join(f"{n} forward(s) of {k}" for k, n in sorted(w.sizes.items(), reverse=True))
    text = (
        f"each forward normalized {w.windows_per_forward} sliding windows of one volume together "
        f"(trainer.sw_batch_size, or trainer.batch_stats_windows): {sizes}"
    )
    if w.single_window_forwards:
        text += (
            f"; {w.single_window_forwards} of {w.forwards} forwards held a single window, normalized by its "
            "own statistics alone"
        )
    return text + "; with another sw_batch_size the score differs: rerun this check with yours"


def worst_layer(checked: Checked) -> str:
    """The BN layer whose running mean sits farthest from the volumes' means, on average over volumes."""
    return max(checked.layer_gaps, key=lambda n: mean_of(checked.layer_gaps[n], "mean_gap"))


def mean_of(rows: dict[str, dict[str, float]], key: str) -> float:
    return sum(r[key] for r in rows.values()) / len(rows)
