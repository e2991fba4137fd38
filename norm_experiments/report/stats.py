"""Small-sample statistics: mean, std, t-intervals, and the Student-t distribution (CDF, p-values, quantiles).

Only the standard library is used (no scipy). The Student-t CDF comes from the regularized incomplete
beta function, evaluated with the continued fraction of Numerical Recipes (Press et al., 3rd ed., 6.4):

    two-sided p for |t| with df degrees of freedom = I_x(df/2, 1/2),  x = df / (df + t^2)

The t quantile is the numeric inverse of that CDF (bisection), accurate to ~1e-10, which is far below the
3-decimal precision the report prints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

_CF_MAX_ITERATIONS = 500
_CF_EPS = 1e-15
_CF_TINY = 1e-300


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean; raises ValueError on an empty sequence."""
    if not values:
        raise ValueError("mean of an empty sequence")
    return math.fsum(values) / len(values)


def sample_std(values: Sequence[float]) -> float:
    """Sample standard deviation (ddof=1). One value has no spread to estimate, so it returns 0."""
    n = len(values)
    if n == 0:
        raise ValueError("std of an empty sequence")
    if n == 1:
        return 0.0
    m = mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (n - 1))


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Modified Lentz evaluation of the continued fraction for I_x(a, b) (Numerical Recipes betacf)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _CF_TINY else _CF_TINY)
    h = d
    for m in range(1, _CF_MAX_ITERATIONS + 1):
        m2 = 2 * m
        # Even step of the recurrence.
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _CF_TINY else _CF_TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _CF_TINY else _CF_TINY
        h *= d * c
        # Odd step.
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _CF_TINY else _CF_TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _CF_TINY else _CF_TINY
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _CF_EPS:
            break
    return h


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0):
        raise ValueError("a and b must be positive")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    # The continued fraction converges fast only for x < (a+1)/(a+b+2); use the symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    if df <= 0:
        raise ValueError("df must be positive")
    if math.isinf(t):
        return 0.0
    return regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = 0.5 * t_two_sided_p(t, df)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Inverse of t_cdf by bisection (the CDF is monotone, so bisection cannot fail)."""
    if not 0.0 < p < 1.0:
        raise ValueError("p must be in (0, 1)")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-12:
            break
    return 0.5 * (low + high)


@dataclass(frozen=True)
class Interval:
    """Mean ± t-interval over seeds. With n=1 there is no spread: low = high = mean and exact=False."""

    n: int
    mean: float
    std: float
    half_width: float
    low: float
    high: float
    level: float = 0.95
    method: str = "seeds only"  # of [low, high]: report.model's SEEDS_AND_CASES where per-case scores exist

    @property
    def has_spread(self) -> bool:
        return self.n >= 2


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean, sample std and the two-sided t confidence interval mean ± t_{(1+level)/2, n-1} * s / sqrt(n)."""
    n = len(values)
    m = mean(values)
    s = sample_std(values)
    if n == 1:
        return Interval(n=1, mean=m, std=0.0, half_width=0.0, low=m, high=m, level=level)
    half = t_quantile(0.5 + level / 2.0, n - 1) * s / math.sqrt(n)
    return Interval(n=n, mean=m, std=s, half_width=half, low=m - half, high=m + half, level=level)
