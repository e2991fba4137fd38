"""The exact power computations (report/power.py) against scipy's noncentral t and against simulation."""

from __future__ import annotations

import math
import random

import pytest
from scipy import stats as sps

from norm_experiments.report.power import (
    confirmable_margin,
    decide_probability,
    detectable_difference,
    nct_cdf,
    power_two_sided,
)


@pytest.mark.parametrize("df", [1, 1.5, 2, 4.3, 11, 60, 1000])
@pytest.mark.parametrize("noncentrality", [-2.0, 0.0, 1.7, 5.0])
def test_noncentral_t_cdf_matches_scipy(df, noncentrality):
    for t in (-3.0, -0.4, 0.0, 1.1, 4.0, 9.0):
        assert nct_cdf(t, df, noncentrality) == pytest.approx(sps.nct.cdf(t, df, noncentrality), abs=1e-7)


@pytest.mark.parametrize("df", [2, 5, 17.5])
def test_two_sided_power_matches_scipy(df):
    crit = sps.t.ppf(1 - 0.005 / 2, df)
    for lam in (0.5, 3.0, 6.0):
        expected = 1 - (sps.nct.cdf(crit, df, lam) - sps.nct.cdf(-crit, df, lam))
        assert power_two_sided(lam, df, 0.005) == pytest.approx(expected, abs=1e-7)


def test_detectable_difference_has_the_power_asked_for_and_the_normal_formula_had_less():
    se, df, alpha = 0.02, 2, 0.005
    exact = detectable_difference(se, df, alpha)
    assert power_two_sided(exact / se, df, alpha) == pytest.approx(0.8, abs=1e-4)
    # The formula the report used before, (t_{1-a/2} + t_{0.8}) SE, gives less than 80 % at df = 2.
    normal = (sps.t.ppf(1 - alpha / 2, df) + sps.t.ppf(0.8, df)) * se
    assert power_two_sided(normal / se, df, alpha) < 0.75
    assert exact > normal


def _simulated_decide(delta, sigma, df, alpha, margin, n=40000, seed=3):
    rng = random.Random(seed)
    crit = sps.t.ppf(1 - alpha / 2, df)
    decided = 0
    for _ in range(n):
        d = rng.gauss(delta, sigma)
        se = sigma * math.sqrt(rng.gammavariate(df / 2, 2) / df)
        low, high = d - crit * se, d + crit * se
        decided += low > 0 or high < 0 or (-margin < low and high < margin)
    return decided / n


@pytest.mark.parametrize("delta", [0.0, 0.01, 0.03, 0.08])
def test_decide_probability_matches_simulation(delta):
    sigma, df, alpha, margin = 0.012, 6.5, 0.01, 0.05
    expected = _simulated_decide(delta, sigma, df, alpha, margin)
    assert decide_probability(delta, sigma, df, alpha, margin) == pytest.approx(expected, abs=0.01)


def test_confirmable_margin_is_shown_with_80_percent_when_the_truth_is_zero():
    se, df, alpha = 0.01, 8, 0.01
    margin = confirmable_margin(se, df, alpha)
    # decide_probability also counts the (wrong) intervals that exclude 0: at most alpha more.
    assert 0.8 - 1e-4 <= decide_probability(0.0, se, df, alpha, margin) <= 0.8 + alpha
    assert decide_probability(0.0, se, df, alpha, 0.9 * margin) < 0.75
