"""norm-exp-check's statistics and verdict, in process on hand-made per-case scores: the paired interval over
cases against a hand computation, each verdict (better / worse / equivalent / inconclusive / untestable) and the
sentence it prints, the windows sentence, and when repaired weights are written."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from norm_experiments.check import handle_repaired
from norm_experiments.diagnose.case_verdicts import case_means, cases_to_confirm, compare_modes, verdict
from norm_experiments.diagnose.scoring import Checked, WindowBatches
from norm_experiments.report.verdicts import Verdict
from norm_experiments.training.evaluate import DICE, HD95, PRESENT, ValResult, summarize

CASES = ["case_a", "case_b", "case_c", "case_d", "case_e", "case_f"]
GAP_ROW = {"batch_mean": 1.0, "running_mean": 0.0, "batch_var": 1.0, "running_var": 1.0, "var_gap": 0.1}


def result(per_case: list[float], hd95: float = 10.0) -> ValResult:
    """Scores of len(per_case) cases, two foreground classes, both with the case's Dice."""
    totals = torch.zeros(len(per_case), 3, 2, dtype=torch.float64)
    for i, dice in enumerate(per_case):
        totals[i, DICE] = dice
        totals[i, HD95] = hd95
        totals[i, PRESENT] = 1.0
    return summarize(totals, surface=True, case_names=CASES[: len(per_case)])


def checked(running: list[float], precise: list[float], batch: list[float]) -> Checked:
    scores = {"running": result(running, 20.0), "precise": result(precise, 10.0), "batch": result(batch, 5.0)}
    gaps = {"layer0": {"case_a": GAP_ROW | {"mean_gap": 1.5}, "case_b": GAP_ROW | {"mean_gap": 0.5}}}
    return Checked(scores, ["a", "b"], gaps, 8, WindowBatches(4, Counter({4: 6, 1: 2})))


def offsets(base: list[float], shift: float, noise: float) -> list[float]:
    """base + shift, with an alternating ±noise per case (a spread between cases)."""
    return [b + shift + (noise if i % 2 else -noise) for i, b in enumerate(base)]


BASE = [0.70, 0.72, 0.74, 0.76, 0.78, 0.80]


def test_case_dice_averages_the_classes_a_case_holds() -> None:
    totals = torch.zeros(2, 3, 2, dtype=torch.float64)
    totals[0, DICE] = torch.tensor([0.8, 0.4])
    totals[0, PRESENT] = torch.tensor([1.0, 1.0])
    totals[1, DICE] = torch.tensor([0.6, 0.0])
    totals[1, PRESENT] = torch.tensor([1.0, 0.0])  # the second class is absent from case 2
    scores = summarize(totals, surface=False, case_names=["one", "two"])
    assert case_means(scores) == pytest.approx({"one": 0.6, "two": 0.6})


def test_interval_is_the_paired_t_interval_over_cases_by_hand() -> None:
    running = BASE
    batch = [0.80, 0.75, 0.90, 0.81, 0.85, 0.95]
    gaps = compare_modes(checked(running, running, batch).scores, margin=0.02)
    c = gaps.gap("batch")
    diffs = [0.10, 0.03, 0.16, 0.05, 0.07, 0.15]
    mean = sum(diffs) / 6
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 5)
    # t_{0.9875, 5} = 3.1634 (two comparisons: Bonferroni alpha 0.025 each, a 97.5 % interval)
    half = 3.16338 * sd / math.sqrt(6)
    assert c.difference == pytest.approx(mean)
    assert (c.low, c.high) == pytest.approx((mean - half, mean + half), abs=1e-4)
    assert c.verdict == Verdict.BETTER


@pytest.mark.parametrize(
    ("shift", "noise", "expected"),
    [
        (0.20, 0.01, Verdict.BETTER),
        (-0.20, 0.01, Verdict.WORSE),
        (0.001, 0.002, Verdict.EQUIVALENT),
        (0.0, 0.15, Verdict.INCONCLUSIVE),
    ],
)
def test_each_verdict(shift: float, noise: float, expected: Verdict) -> None:
    gaps = compare_modes(checked(BASE, BASE, offsets(BASE, shift, noise)).scores, margin=0.02)
    assert gaps.gap("batch").verdict == expected
    assert gaps.gap("precise").verdict == Verdict.EQUIVALENT  # identical to running: no spread, no gap


def text_of(
    running: list[float], precise: list[float], batch: list[float], repaired: str | None = None
) -> str:
    c = checked(running, precise, batch)
    return "\n".join(verdict(c, compare_modes(c.scores, 0.02), repaired))


def test_loss_with_precise_bn_repairing_it() -> None:
    text = text_of(BASE, offsets(BASE, 0.15, 0.01), offsets(BASE, 0.16, 0.01))
    assert "Eval mode LOSES accuracy: batch statistics score +0.160 Dice [" in text
    assert "HD95 20.0 mm against 5.0 mm" in text
    assert "PreciseBN repairs it: recomputed statistics score 0.900 in plain model.eval() (+0.150 [" in text
    assert "1.50σ from a validation volume's mean (case_a, at layer0; 1.00σ on average" in text
    assert "What 6 cases can show: a true gap of" in text


def test_loss_with_precise_bn_repairing_part() -> None:
    text = text_of(BASE, offsets(BASE, 0.10, 0.01), offsets(BASE, 0.20, 0.01))
    assert "PreciseBN repairs part of it (0.850, +0.100 [" in text and "about 50% of what batch" in text
    assert 'bn_eval_mode(model, "batch")' in text and "GroupNorm or InstanceNorm" in text
    # What "batch statistics" meant, from the windows each forward held
    assert "6 forward(s) of 4, 2 forward(s) of 1" in text
    assert "2 of 8 forwards held a single window" in text and "rerun this check with yours" in text


def test_loss_that_precise_bn_is_not_shown_to_repair() -> None:
    text = text_of(BASE, offsets(BASE, 0.0, 0.15), offsets(BASE, 0.15, 0.01))
    assert "PreciseBN is not shown to repair it (inconclusive: +0.000 [" in text
    assert "Batch statistics do (0.900)" in text and "LOSES" in text


def test_equivalent_says_fine() -> None:
    text = text_of(BASE, offsets(BASE, 0.001, 0.002), offsets(BASE, -0.001, 0.002))
    assert "Eval mode is equivalent within ±0.02 Dice to PreciseBN and to batch statistics" in text
    assert "your model is fine in model.eval() on this data" in text and "LOSES" not in text


def test_worse_alternatives_say_fine() -> None:
    text = text_of(BASE, offsets(BASE, -0.2, 0.01), offsets(BASE, 0.001, 0.002))
    assert (
        "No other evaluation scores better than eval mode (PreciseBN worse, batch stats equivalent)" in text
    )
    assert "your model is fine in model.eval()" in text


def test_inconclusive_never_says_fine_and_says_how_many_cases() -> None:
    text = text_of(BASE, offsets(BASE, 0.0, 0.001), offsets(BASE, 0.0, 0.1))
    assert "Inconclusive: on these 6 cases, batch stats − running [" in text
    assert "cannot say your model is fine" in text and "is fine in model.eval() on this data" not in text
    needed = int(text.split("about ", 1)[1].split(" validation cases", 1)[0])
    assert needed > 6 and "would show equivalence within ±0.02 (if there is no gap)" in text


def test_inconclusive_large_gap_says_how_many_cases_would_find_it() -> None:
    text = text_of(BASE, offsets(BASE, 0.0, 0.001), offsets(BASE, 0.1, 0.25))
    assert "Inconclusive" in text
    assert "would find a gap of +0.100 (if that is the true gap) with 80% power" in text


def test_one_case_is_untestable() -> None:
    text = text_of([0.7], [0.8], [0.9])
    assert "1 scored case(s) give no interval, so no verdict" in text
    assert "LOSES" not in text and "fine" not in text


def test_cases_to_confirm_is_the_smallest_sufficient_count() -> None:
    c = compare_modes(checked(BASE, BASE, offsets(BASE, 0.0, 0.05)).scores, 0.02)
    gap = c.gap("batch")
    n = cases_to_confirm(gap.estimate, c.family.alpha_each, 0.02)
    # For comparison with a hand computation: sd of the alternating ±0.05 differences is 0.0548.
    assert 30 < n < 200
    from norm_experiments.report.stats import t_quantile

    sd = gap.estimate.se * math.sqrt(6)

    def half(k: int) -> float:
        return (t_quantile(1 - 0.0125, k - 1) + t_quantile(0.9, k - 1)) * sd / math.sqrt(k)

    assert half(n) < 0.02 <= half(n - 1)


@pytest.mark.parametrize(
    ("precise_shift", "written"),
    [(0.15, True), (0.01, False), (0.0, False)],  # better by more than the margin / within it / no gain
)
def test_repaired_weights_only_beyond_the_margin(tmp_path: Path, precise_shift: float, written: bool) -> None:
    c = checked(BASE, offsets(BASE, precise_shift, 0.001), offsets(BASE, 0.2, 0.01))
    gaps = compare_modes(c.scores, 0.02)
    target = tmp_path / "repaired.pt"
    sentence = handle_repaired(target, gaps, nn.Linear(2, 2))
    assert target.exists() == written, sentence
    assert ("written to" in sentence) == written
    if not written:
        assert "written only when PreciseBN is better and gains more than the margin (0.02 Dice)" in sentence


def test_two_cases_with_a_wide_spread_claim_no_gap_beyond_one_dice() -> None:
    """2 validation cases: "a true gap of 4.574 Dice is found with 80% power", a gap no Dice can have."""
    from norm_experiments.diagnose.case_verdicts import power_line

    c = checked([0.2, 0.8], [0.2, 0.8], [0.9, 0.3])
    line = power_line(compare_modes(c.scores, 0.02))
    assert line is not None and line.startswith("What 2 cases can show: nothing; no gap a Dice can have")
    wide = checked(BASE, BASE, offsets(BASE, 0.0, 0.02))
    line = power_line(compare_modes(wide.scores, 0.02))
    assert line is not None and "a true gap of 0.0" in line and "equivalence within ±0.0" in line
