"""Statistics against exact or published values."""

from __future__ import annotations

import math

import pytest

from norm_experiments.report.stats import (
    mean,
    regularized_incomplete_beta,
    sample_std,
    t_cdf,
    t_interval,
    t_quantile,
    t_two_sided_p,
)


def test_mean_std_interval_of_three_values():
    iv = t_interval([0.7, 0.8, 0.9])
    assert iv.mean == pytest.approx(0.8)
    assert iv.std == pytest.approx(0.1)
    assert iv.half_width == pytest.approx(0.2484, abs=1e-4)  # 4.3027 * 0.1 / sqrt(3)
    assert (iv.low, iv.high) == pytest.approx((0.8 - 0.24841, 0.8 + 0.24841), abs=1e-5)
    assert iv.has_spread


def test_single_value_has_no_spread():
    iv = t_interval([0.42])
    assert (iv.mean, iv.std, iv.low, iv.high, iv.half_width) == (0.42, 0.0, 0.42, 0.42, 0.0)
    assert not iv.has_spread
    assert sample_std([0.42]) == 0.0


def test_empty_input_is_an_error():
    with pytest.raises(ValueError):
        mean([])


@pytest.mark.parametrize(("df", "expected"), [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)])
def test_t_quantile_matches_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-3)


def test_t_quantile_is_symmetric_and_inverts_cdf():
    assert t_quantile(0.025, 4) == pytest.approx(-t_quantile(0.975, 4))
    assert t_cdf(t_quantile(0.9, 7), 7) == pytest.approx(0.9, abs=1e-10)


def test_two_sided_p_known_values():
    assert t_two_sided_p(2.0, 5) == pytest.approx(0.1019, abs=1e-4)
    assert t_two_sided_p(0.0, 5) == pytest.approx(1.0)
    assert t_two_sided_p(math.inf, 3) == 0.0
    # Closed forms: df=1 is Cauchy, df=2 has p = 1 - |t| / sqrt(t^2 + 2).
    assert t_two_sided_p(1.5, 1) == pytest.approx(1 - 2 / math.pi * math.atan(1.5), abs=1e-12)
    assert t_two_sided_p(3.0, 2) == pytest.approx(1 - 3 / math.sqrt(11), abs=1e-12)


def test_t_cdf_large_df_approaches_normal():
    assert t_cdf(1.959964, 1e6) == pytest.approx(0.975, abs=1e-5)
    assert t_cdf(-1.0, 7) == pytest.approx(0.17531, abs=1e-5)


def test_incomplete_beta_edges_and_symmetry():
    assert regularized_incomplete_beta(2.0, 3.0, 0.0) == 0.0
    assert regularized_incomplete_beta(2.0, 3.0, 1.0) == 1.0
    # I_x(1, 1) = x and I_x(a, b) = 1 - I_{1-x}(b, a).
    assert regularized_incomplete_beta(1.0, 1.0, 0.3) == pytest.approx(0.3)
    assert regularized_incomplete_beta(2.5, 0.5, 0.7) == pytest.approx(
        1 - regularized_incomplete_beta(0.5, 2.5, 0.3)
    )
