"""The seeds x cases model, the verdicts and the power formulas, against hand-computed values and against a
simulation of the model they assume."""

from __future__ import annotations

import json
import math
import random

import pytest

from norm_experiments.report.collect import read_run
from norm_experiments.report.model import Estimate, Scores, crossed_estimate, paired, seed_estimate
from norm_experiments.report.verdicts import (
    Comparison,
    Family,
    Verdict,
    confirmable_margin,
    detectable_difference,
    verdict,
)


def test_crossed_estimate_by_hand() -> None:
    # Seeds x cases [[1, 2], [3, 6]]: grand mean 3, seed means 1.5 and 4.5, case means 2 and 4.
    # MS_seed = 2 * (1.5^2 + 1.5^2) / 1 = 9, MS_case = 2 * (1 + 1) / 1 = 4, MS_e = 4 * 0.5^2 / 1 = 1.
    # SE^2 = (9 + 4) / (2 * 2), df = 13^2 / (9^2 / 1 + 4^2 / 1) = 169 / 97.
    found = crossed_estimate([[1.0, 2.0], [3.0, 6.0]])
    assert found.mean == pytest.approx(3.0)
    assert found.se == pytest.approx(math.sqrt(13 / 4))
    assert found.df == pytest.approx(169 / 97)
    assert (found.n_seeds, found.n_cases, found.method) == (2, 2, "seeds × cases")


def test_floor_at_the_residual_noise() -> None:
    # Only interaction: MS_seed = MS_case = 0; residuals +-0.5, MS_e = 4 * 0.25 / 1 = 1, so the floor
    # SE^2 = MS_e / (S C) = 1 / 4 with df = (S-1)(C-1) = 1.
    found = crossed_estimate([[1.0, 0.0], [0.0, 1.0]])
    assert (found.mean, found.se, found.df) == (pytest.approx(0.5), pytest.approx(0.5), 1.0)
    assert crossed_estimate([[0.2, 0.2], [0.2, 0.2]]).se == 0.0


def test_without_case_variation_it_is_the_paired_t_test_over_seeds() -> None:
    seed_values = [0.1, 0.2, 0.3, 0.45]
    crossed = crossed_estimate([[v] * 5 for v in seed_values])
    seeds = seed_estimate(seed_values)
    assert (crossed.mean, crossed.se, crossed.df) == (
        pytest.approx(seeds.mean),
        pytest.approx(seeds.se),
        pytest.approx(3.0),
    )
    # Differences 0.1, 0.2, 0.3: mean 0.2, sd 0.1, t = 2 sqrt(3), df 2 -> p = 1 - t / sqrt(t^2 + 2).
    t = 2 * math.sqrt(3)
    assert seed_estimate([0.1, 0.2, 0.3]).p_value == pytest.approx(1 - t / math.sqrt(t * t + 2))
    assert seed_estimate([0.2]) is None and crossed_estimate([[0.1, 0.2]]) is None


def test_simulated_model_expectation_and_coverage() -> None:
    """Draw 3 seeds x 5 cases from the model: E[SE^2] = var_s/S + var_c/C + 2 var_e/(S C) (the documented
    conservative expectation; the floor rarely acts here), and the 95% interval covers the true mean."""
    rng = random.Random(20)
    s_sd, c_sd, e_sd, n_s, n_c = 0.03, 0.05, 0.02, 3, 5
    draws, covered, se2 = 3000, 0, []
    for _ in range(draws):
        seed = [rng.gauss(0, s_sd) for _ in range(n_s)]
        case = [rng.gauss(0, c_sd) for _ in range(n_c)]
        found = crossed_estimate([[0.5 + a + b + rng.gauss(0, e_sd) for b in case] for a in seed])
        se2.append(found.se**2)
        covered += abs(found.mean - 0.5) <= found.half_width(0.05)
    expected = s_sd**2 / n_s + c_sd**2 / n_c + 2 * e_sd**2 / (n_s * n_c)
    assert sum(se2) / draws == pytest.approx(expected, rel=0.08)
    assert covered / draws >= 0.94


def write_record(tmp_path, per_case) -> object:
    path = tmp_path / "metrics.json"
    data = {"status": "completed", "norm": "batch", "batch_size": 1, "seed": 0, "per_case": per_case}
    path.write_text(json.dumps(data))
    return read_run(path)


def test_case_score_is_the_mean_over_present_classes(tmp_path) -> None:
    run = write_record(
        tmp_path,
        {
            "running": {
                "a": {"dice": {"liver": 0.8, "tumour": 0.4}, "hd95": {"liver": 3.0, "tumour": None}},
                "b": {"dice": {"liver": 0.9, "tumour": None}, "hd95": {"liver": 2.0, "tumour": None}},
                "empty": {"dice": {"liver": None, "tumour": None}, "hd95": {"liver": None, "tumour": None}},
            }
        },
    )
    assert run.case_scores("running", "dice") == {"a": pytest.approx(0.6), "b": pytest.approx(0.9)}
    assert run.case_scores("running", "hd95") == {"a": 3.0, "b": 2.0}
    assert run.case_scores("batch", "dice") is None  # not recorded for that mode
    assert write_record(tmp_path, None).case_scores("running", "dice") is None


def test_paired_uses_the_cases_every_seed_has_and_falls_back_to_seeds() -> None:
    a = Scores({0: 0.7, 1: 0.8}, {0: {"x": 0.7, "y": 0.7, "z": 0.1}, 1: {"x": 0.8, "y": 0.8}})
    b = Scores({0: 0.5, 1: 0.5}, {0: {"x": 0.5, "y": 0.5, "z": 0.9}, 1: {"x": 0.5, "y": 0.5}})
    found = paired(a, b)  # case z is missing in seed 1: left out everywhere
    assert found.estimate.n_cases == 2 and found.estimate.mean == pytest.approx(0.25)
    assert (found.a_mean, found.b_mean) == (pytest.approx(0.75), pytest.approx(0.5))
    older = Scores({0: 0.5, 1: 0.6})  # a record without per-case scores: seeds only
    assert paired(a, older).estimate.method == "seeds only"
    assert paired(a, older).estimate.mean == pytest.approx(0.2)
    assert paired(Scores({0: 0.9, 7: 0.1}), Scores({0: 0.7, 3: 0.9})).estimate is None  # one shared seed
    assert paired(Scores({7: 0.1}), Scores({3: 0.9})) is None


@pytest.mark.parametrize(
    ("low", "high", "lower_is_better", "expected"),
    [
        (0.01, 0.05, False, Verdict.BETTER),
        (-0.05, -0.01, False, Verdict.WORSE),
        (-0.05, -0.01, True, Verdict.BETTER),  # a distance that went down
        (-0.019, 0.019, False, Verdict.EQUIVALENT),
        (-0.019, 0.021, False, Verdict.INCONCLUSIVE),
        (-0.3, 0.3, False, Verdict.INCONCLUSIVE),
        (0.001, 0.01, False, Verdict.BETTER),  # inside the margin but above 0: a small, shown difference
    ],
)
def test_verdict_is_read_off_the_interval(low, high, lower_is_better, expected) -> None:
    assert verdict(low, high, 0.02, lower_is_better) is expected


def test_family_bonferroni_interval_and_p() -> None:
    estimates = [Estimate(0.1, 0.02, 4.0, 3, 5), Estimate(0.0, 0.02, 4.0, 3, 5), None]
    family = Family("reference", "")
    family.comparisons = [
        Comparison(f"r{i}", "ref", 1, 0.0, 0.0, e, 3 if e else 1) for i, e in enumerate(estimates)
    ]
    family.decide()
    first, second, third = family.comparisons
    assert family.m == 2 and family.alpha_each == 0.025
    # t(1 - 0.025 / 2, 4) = 3.4954: the 97.5% interval.
    assert (first.low, first.high) == (
        pytest.approx(0.1 - 3.4954 * 0.02, abs=1e-4),
        pytest.approx(0.1 + 3.4954 * 0.02, abs=1e-4),
    )
    assert first.p_adjusted == pytest.approx(2 * first.estimate.p_value)
    assert (first.verdict, second.verdict, third.verdict) == (
        Verdict.BETTER,
        Verdict.INCONCLUSIVE,
        Verdict.UNTESTABLE,
    )


def test_power_formulas_by_hand() -> None:
    from scipy import stats as sps

    estimate = Estimate(0.0, 0.01, 10.0, 3, 5)
    # Exact noncentral t: at the detectable difference the two-sided 95 % test has 80 % power (scipy), a
    # little more than the normal approximation (t(0.975, 10) + t(0.8, 10)) SE = 0.031072 gave.
    detect = detectable_difference(estimate, 0.05)
    crit = sps.t.ppf(0.975, 10)
    lam = detect / 0.01
    assert 1 - (sps.nct.cdf(crit, 10, lam) - sps.nct.cdf(-crit, 10, lam)) == pytest.approx(0.8, abs=1e-5)
    assert detect == pytest.approx(0.031100, abs=1e-5)
    assert confirmable_margin(estimate, 0.05) == pytest.approx(0.036022, abs=1e-5)
    family = Family("gap", "")
    family.comparisons = [Comparison("a", "b", 1, 0, 0, estimate, 3), Comparison("c", "d", 2, 0, 0, None, 1)]
    power = family.decide().power()
    assert power.alpha_each == 0.05 and power.detectable[0] == pytest.approx(detect, abs=1e-9)
    assert Family("gap", "").power() is None
