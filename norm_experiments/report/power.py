"""Exact power of the t-based verdicts: the noncentral t distribution, and what a design can decide.

A difference estimated as D with standard error SE and df degrees of freedom is read off the interval
D ± t_{1-a/2, df} SE (verdicts.py). When the true difference is delta, D / SE follows a noncentral t with df
degrees of freedom and noncentrality lambda = delta / sigma (sigma: the true standard error). Its CDF is

    P(T <= t) = integral over u > 0 of Phi(t u - lambda) g(u) du,   u = sqrt(V / df), V ~ chi-square(df)

(Johnson, Kotz & Balakrishnan, Continuous Univariate Distributions vol. 2, ch. 31), evaluated here by
Simpson's rule on the density g of u. The same integral gives the probability that the interval decides:
for a given u the interval's half-width is t_q sigma u, so it excludes 0 when |D| > t_q sigma u and lies
inside (-margin, +margin) when |D| < margin - t_q sigma u; D ~ N(delta, sigma^2) is integrated exactly.

The normal approximation (t_{1-a/2} + t_power) SE that the report used before is optimistic at few degrees
of freedom; tests/report/test_power.py checks this module against scipy.stats.nct. Standard library only,
as the rest of the report.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from norm_experiments.report.stats import t_quantile

POWER = 0.8  # the power a design is sized for
_SIMPSON_INTERVALS = 2000  # even; error far below the 3 decimals a power is printed with


def normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def solve_increasing(
    f: Callable[[float], float], target: float, low: float, high: float, tol: float
) -> float:
    """The smallest x in [low, high] with f(x) >= target, for a non-decreasing f (bisection to `tol`)."""
    while high - low > tol:
        mid = 0.5 * (low + high)
        if f(mid) < target:
            low = mid
        else:
            high = mid
    return high


def normal_quantile(p: float) -> float:
    return solve_increasing(normal_cdf, p, -40.0, 40.0, 1e-12)


def _u_log_density(u: float, df: float) -> float:
    """log g(u) for u = sqrt(chi2_df / df) (a scaled chi distribution)."""
    if u <= 0.0:
        return -math.inf
    half = df / 2.0
    return (
        half * math.log(df)
        - (half - 1.0) * math.log(2.0)
        - math.lgamma(half)
        + (df - 1.0) * math.log(u)
        - df * u * u / 2.0
    )


def _over_u(df: float, inner: Callable[[float], float]) -> float:
    """E[inner(u)] for u = sqrt(chi2_df / df): Simpson's rule over the bulk of u's density. At small df the
    density behaves as u^(df-1) near 0, so the rule runs over w = sqrt(u) there (u = w^2, du = 2w dw)."""
    if math.isinf(df):
        return inner(1.0)
    spread = 1.0 / math.sqrt(2.0 * df)  # u's standard deviation, for large df
    low = max(0.0, 1.0 - 14.0 * spread)
    high = 1.0 + 14.0 * spread + (10.0 if df < 3 else 4.0 if df < 10 else 0.0)  # heavy right tail at small df
    squared = low == 0.0
    if squared:
        high = math.sqrt(high)
    n = _SIMPSON_INTERVALS
    h = (high - low) / n
    total = 0.0
    for i in range(n + 1):
        x = low + i * h
        u, jacobian = (x * x, 2.0 * x) if squared else (x, 1.0)
        weight = 1 if i in (0, n) else (4 if i % 2 else 2)
        density = math.exp(_u_log_density(u, df)) * jacobian if u > 0.0 else 0.0
        if density > 0.0:
            total += weight * density * inner(u)
    return total * h / 3.0


def nct_cdf(t: float, df: float, noncentrality: float) -> float:
    """P(T <= t) for the noncentral t with df degrees of freedom."""
    if df <= 0:
        raise ValueError("df must be positive")
    return min(1.0, max(0.0, _over_u(df, lambda u: normal_cdf(t * u - noncentrality))))


def power_two_sided(noncentrality: float, df: float, alpha: float) -> float:
    """P(|T| > t_{1-alpha/2, df}): the chance that the (1 - alpha) interval excludes 0."""
    crit = t_quantile(1.0 - alpha / 2.0, df)
    inside = nct_cdf(crit, df, noncentrality) - nct_cdf(-crit, df, noncentrality)
    return min(1.0, max(0.0, 1.0 - inside))


def detectable_difference(se: float, df: float, alpha: float, power: float = POWER) -> float:
    """Smallest true difference whose (1 - alpha) interval excludes 0 with `power` (exact noncentral t)."""
    if se == 0.0:
        return 0.0
    crit = t_quantile(1.0 - alpha / 2.0, df)
    high = crit + 10.0
    while power_two_sided(high, df, alpha) < power:
        high *= 2.0
    return solve_increasing(lambda lam: power_two_sided(lam, df, alpha), power, 0.0, high, 1e-6) * se


def decide_probability(delta: float, sigma: float, df: float, alpha: float, margin: float) -> float:
    """The chance that the (1 - alpha) interval decides (excludes 0, or lies inside ±margin) when the true
    difference is `delta` and the true standard error `sigma`."""
    if sigma == 0.0:
        return 1.0
    crit = t_quantile(1.0 - alpha / 2.0, df)

    def given_u(u: float) -> float:
        excludes = crit * sigma * u  # |D| beyond this excludes 0
        inside = margin - crit * sigma * u  # |D| below this is equivalent
        if inside > excludes:
            return 1.0  # every D decides
        p_beyond = 1.0 - _abs_normal_cdf(excludes, delta, sigma)
        p_inside = _abs_normal_cdf(inside, delta, sigma) if inside > 0 else 0.0
        return p_beyond + p_inside

    return min(1.0, max(0.0, _over_u(df, given_u)))


def confirmable_margin(se: float, df: float, alpha: float, power: float = POWER) -> float:
    """Smallest margin whose equivalence is shown with `power` when the true difference is 0 (exact)."""
    if se == 0.0:
        return 0.0

    def shown(margin: float) -> float:
        crit = t_quantile(1.0 - alpha / 2.0, df)
        return _over_u(
            df, lambda u: _abs_normal_cdf(margin - crit * se * u, 0.0, se) if margin > crit * se * u else 0.0
        )

    high = 10.0 * se * (t_quantile(1.0 - alpha / 2.0, df) + 3.0)
    return solve_increasing(shown, power, 0.0, high, 1e-7 * se)


def _abs_normal_cdf(x: float, mean: float, sd: float) -> float:
    """P(|D| < x) for D ~ N(mean, sd^2)."""
    if x <= 0.0:
        return 0.0
    return normal_cdf((x - mean) / sd) - normal_cdf((-x - mean) / sd)
