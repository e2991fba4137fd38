"""One question, one family, one verdict per comparison, and what the family's design can detect.

A family is every comparison that answers one declared question in one condition (BatchNorm's evaluation-mode
gaps; every norm minus the reference norm). Its m tested comparisons share the family-wise error rate alpha by
Bonferroni: each gets alpha' = alpha / m and a two-sided (1 - alpha') interval, and its verdict is read off that
printed interval, so an interval and its verdict can never disagree (Holm's step-down has no intervals that
match its rejections):

- better / worse: the interval lies entirely above / below 0 (in the direction of a better metric);
- equivalent within ±margin: the interval lies inside (-margin, +margin): two one-sided tests (TOST), each at
  alpha' / 2, reject a difference of margin or more in either direction;
- inconclusive: neither; the interval is what the data allow;
- untestable: fewer than 2 seeds on both sides.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from enum import Enum

from norm_experiments.report import power as exact
from norm_experiments.report.model import Estimate, Scores, paired

ALPHA = 0.05  # family-wise error rate of every family
DEFAULT_MARGIN = 0.02  # equivalence margin, in the metric's units (Dice)
HD95_MARGIN = 1.0  # mm: a third of the quick study's 3 mm voxel


def default_margin(metric: str) -> float:
    """The equivalence margin a report uses for `metric` unless --margin says otherwise: 1 mm for HD95, else
    0.02 (Dice)."""
    return HD95_MARGIN if metric == "val_hd95" else DEFAULT_MARGIN


POWER = exact.POWER


class Verdict(str, Enum):
    BETTER = "better"
    WORSE = "worse"
    EQUIVALENT = "equivalent"
    INCONCLUSIVE = "inconclusive"
    UNTESTABLE = "untestable"


@dataclass
class Comparison:
    """a - b at one batch size, with its verdict once its family is decided."""

    label: str  # what a is (a row, or a row with an evaluation mode)
    against: str  # what b is
    batch_size: int
    a_mean: float
    b_mean: float
    estimate: Estimate | None  # None: fewer than 2 shared seeds
    n_seeds: int
    # Set by decide():
    low: float | None = None
    high: float | None = None
    p_adjusted: float | None = None
    verdict: Verdict = Verdict.UNTESTABLE

    @property
    def difference(self) -> float:
        return self.estimate.mean if self.estimate else self.a_mean - self.b_mean

    @property
    def significant(self) -> bool:
        return self.verdict in (Verdict.BETTER, Verdict.WORSE)


@dataclass
class Power:
    """What the family's design detects at its observed standard errors (median and range over comparisons)."""

    alpha_each: float
    detectable: tuple[float, float, float]  # (median, min, max) of the 80 %-power difference
    confirmable: tuple[float, float, float]  # (median, min, max) of the margin TOST confirms at 80 % power


@dataclass
class Family:
    """All comparisons of one question in one condition."""

    question: str  # "gap" or "reference"
    condition: str
    comparisons: list[Comparison] = field(default_factory=list)
    alpha: float = ALPHA
    margin: float = DEFAULT_MARGIN
    lower_is_better: bool = False

    @property
    def tested(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.estimate is not None]

    @property
    def m(self) -> int:
        return len(self.tested)

    @property
    def alpha_each(self) -> float:
        return self.alpha / max(self.m, 1)

    @property
    def methods(self) -> list[str]:
        return sorted({c.estimate.method for c in self.tested})  # type: ignore[union-attr]

    def decide(self) -> Family:
        """Give every comparison its interval, Bonferroni p and verdict."""
        for c in self.comparisons:
            if c.estimate is None:
                c.verdict = Verdict.UNTESTABLE
                continue
            half = c.estimate.half_width(self.alpha_each)
            c.low, c.high = c.estimate.mean - half, c.estimate.mean + half
            c.p_adjusted = min(1.0, self.m * c.estimate.p_value)
            c.verdict = verdict(c.low, c.high, self.margin, self.lower_is_better)
        return self

    def power(self) -> Power | None:
        """None when nothing was tested."""
        estimates = [c.estimate for c in self.tested]
        if not estimates:
            return None
        detect = [detectable_difference(e, self.alpha_each) for e in estimates]  # type: ignore[arg-type]
        confirm = [confirmable_margin(e, self.alpha_each) for e in estimates]  # type: ignore[arg-type]
        return Power(self.alpha_each, _spread(detect), _spread(confirm))


def compare(label: str, against: str, bs: int, a: Scores, b: Scores) -> Comparison:
    """a - b over their shared seeds (and cases); undecided until its family decides."""
    found = paired(a, b)
    if found is None:  # no shared seed: nothing to pair
        a_values, b_values = list(a.by_seed.values()), list(b.by_seed.values())
        a_mean = sum(a_values) / len(a_values) if a_values else float("nan")
        b_mean = sum(b_values) / len(b_values) if b_values else float("nan")
        return Comparison(label, against, bs, a_mean, b_mean, None, 0)
    return Comparison(label, against, bs, found.a_mean, found.b_mean, found.estimate, found.n_seeds)


def verdict(low: float, high: float, margin: float, lower_is_better: bool = False) -> Verdict:
    """The verdict of an interval of a - b (see the module docstring)."""
    if low > 0 or high < 0:
        a_higher = low > 0
        return Verdict.BETTER if a_higher != lower_is_better else Verdict.WORSE
    if -margin < low and high < margin:
        return Verdict.EQUIVALENT
    return Verdict.INCONCLUSIVE


def detectable_difference(estimate: Estimate, alpha_each: float, power: float = POWER) -> float:
    """Smallest true difference found (two-sided, at alpha_each) with `power`, by the exact noncentral t
    (power.py) at the estimate's SE and df."""
    return exact.detectable_difference(estimate.se, estimate.df, alpha_each, power)


def confirmable_margin(estimate: Estimate, alpha_each: float, power: float = POWER) -> float:
    """Smallest margin whose equivalence is shown with `power` when the true difference is 0 (exact)."""
    return exact.confirmable_margin(estimate.se, estimate.df, alpha_each, power)


def _spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)
