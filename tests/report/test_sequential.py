"""The sequential design (report/sequential.py): its error rate under repeated looks, by simulation through
the report's own code, and its bookkeeping (spending, parsing, verdicts read off the printed interval)."""

from __future__ import annotations

import math

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from norm_experiments.config import CONFIG_DIR, register_resolvers
from norm_experiments.errors import UserError
from norm_experiments.report.model import Estimate, crossed_estimate
from norm_experiments.report.power import decide_probability
from norm_experiments.report.questions import Question, Side
from norm_experiments.report.sequential import Design, decides, parse_design, projected
from norm_experiments.report.simulate import Truth, simulate
from norm_experiments.report.verdicts import verdict

register_resolvers()

ALPHA = 0.05
STUDIES = 2000
# Variance components of the simulated studies (Dice): seed-to-seed SD 0.034, case-to-case SD 0.043, seed x case
# SD 0.014 (the quick study's batch-1 questions have larger seed SDs: docs/explanation/statistics.md).
PILOT = dict(var_seed=0.034**2, var_case=0.043**2, var_e=0.014**2)


def _design(m: int, looks: tuple[int, ...], spending: str = "pocock", margin: float = 0.02) -> Design:
    questions = tuple(Question(f"q{i}", "", Side("a", 1), Side("b", 1), "val_dice", margin) for i in range(m))
    return Design(questions, looks, ALPHA, spending, margin)


def _mc_upper(rate: float, n: int) -> float:
    """The rate plus 2.33 Monte Carlo standard errors (one-sided 99 %)."""
    return rate + 2.33 * math.sqrt(rate * (1 - rate) / n)


def test_null_studies_reject_at_most_alpha_under_repeated_looks():
    design = _design(3, (6, 10, 14))
    result = simulate(design, [Truth(0.0, **PILOT)] * 3, cases=12, studies=STUDIES, seed=11)
    print(
        f"\nfamily-wise error over {STUDIES} null studies, 3 questions, looks {design.looks}: {result.error_rate:.4f}"
    )
    assert result.error_rate <= _mc_upper(ALPHA, STUDIES)


def test_differences_at_the_margin_are_not_called_equivalent_more_than_alpha():
    design = _design(3, (6, 10, 14), margin=0.02)
    truths = [Truth(0.02, **PILOT), Truth(-0.02, **PILOT), Truth(0.02, **PILOT)]
    result = simulate(design, truths, cases=12, studies=STUDIES // 2, seed=12)
    assert result.error_rate <= _mc_upper(ALPHA, STUDIES // 2)


def test_power_at_a_gap_of_0_05_and_the_exact_formula_agree():
    # One look: the simulated chance to decide must match the noncentral t computation of the power line.
    design = _design(1, (10,))
    truth = Truth(0.05, **PILOT)
    result = simulate(design, [truth], cases=12, studies=STUDIES, seed=13)
    s, c = 10, 12
    grid_ms = (
        PILOT["var_e"] + c * PILOT["var_seed"],
        PILOT["var_e"] + s * PILOT["var_case"],
        PILOT["var_e"],
    )
    template = Estimate(0.05, 0.0, 1.0, s, c, grid_ms)
    se, df = projected(template, s)
    predicted = decide_probability(0.05, se, df, design.level(0), design.margin)
    print(
        f"\npower to decide a 0.05 gap, 10 seeds x 12 cases: simulated {result.decided_rate(0):.3f}, exact {predicted:.3f}"
    )
    assert result.decided_rate(0) == pytest.approx(predicted, abs=0.05)
    # Two looks with the same last seed count: the study often stops at 6 seeds, and pays for the early look
    # with a smaller level at the last one (it decides less often than one look at 10 seeds).
    sequential = simulate(_design(1, (6, 10)), [truth], cases=12, studies=STUDIES // 2, seed=14)
    assert sequential.mean_seeds < 8.5
    assert 0.6 < sequential.decided_rate(0) < result.decided_rate(0)


def test_alpha_is_spent_exactly_over_the_looks():
    for spending in ("pocock", "obrien_fleming", "linear"):
        design = _design(4, (5, 9, 14), spending)
        shares = [design.alpha_at(k) for k in range(3)]
        assert all(a > 0 for a in shares)
        assert math.fsum(shares) == pytest.approx(ALPHA, abs=1e-12)
        assert design.level(1) == pytest.approx(shares[1] / 4)
    # Pocock spends more early than O'Brien-Fleming.
    assert _design(1, (5, 10)).alpha_at(0) > _design(1, (5, 10), "obrien_fleming").alpha_at(0)


def test_the_verdict_equals_the_one_read_off_the_printed_interval():
    grids = [
        [[0.10, 0.12, 0.09], [0.11, 0.10, 0.13], [0.08, 0.12, 0.10]],  # clearly above 0
        [[0.001, -0.002, 0.003], [0.0, 0.002, -0.001], [0.002, 0.001, 0.0]],  # inside ±0.02
        [[0.05, -0.06, 0.02], [-0.04, 0.07, -0.01], [0.03, -0.02, 0.05]],  # neither
    ]
    for grid in grids:
        est = crossed_estimate(grid)
        for level in (0.05, 0.01, 0.001):
            half = est.half_width(level)
            assert decides(est, level, 0.02) == verdict(est.mean - half, est.mean + half, 0.02)


def test_parse_design_names_the_wrong_key():
    good = {
        "looks": [6, 10],
        "questions": {
            "q": {"a": {"norm": "batch", "batch_size": 1}, "b": {"norm": "instance", "batch_size": 1}}
        },
    }
    assert parse_design(good, "study").looks == (6, 10)
    cases = [
        ({**good, "looks": [10, 6]}, "study.looks"),
        ({**good, "looks": [1]}, "study.looks"),
        ({**good, "spending": "haybittle"}, "study.spending"),
        ({**good, "alfa": 0.05}, "unknown key 'alfa'"),
        ({**good, "questions": {}}, "study.questions"),
        (
            {**good, "questions": {"q": {**good["questions"]["q"], "b": good["questions"]["q"]["a"]}}},
            "the same series",
        ),
        (
            {
                **good,
                "questions": {
                    "q": {**good["questions"]["q"], "a": {"norm": "batch", "batch_size": 1, "eval": "runing"}}
                },
            },
            "study.questions.q.a.eval",
        ),
        (
            {**good, "questions": {"q": {**good["questions"]["q"], "a": {"norm": "batch", "batchsize": 1}}}},
            "did you mean 'batch_size'",
        ),
    ]
    for raw, needle in cases:
        with pytest.raises(UserError, match=needle.replace("(", r"\(")):
            parse_design(raw, "study")
    with pytest.raises(
        UserError, match="got 'runing'; did you mean 'batch_alone'|got 'modle'; did you mean 'model'"
    ):
        parse_design(
            {
                **good,
                "questions": {
                    "q": {**good["questions"]["q"], "b": {**good["questions"]["q"]["b"], "eval": "modle"}}
                },
            },
            "study",
        )


def test_an_hd95_question_without_a_margin_takes_the_reports_mm_margin_not_the_dice_one():
    """A val_hd95 question that set no margin got the study's Dice margin, 0.02 mm: "equivalent" asked within a
    fiftieth of a millimetre. It takes the report's HD95 margin (1 mm); the Dice questions keep the study's."""
    sides = {
        "a": {"norm": "instance", "batch_size": 1, "eval": "model_lcc"},
        "b": {"norm": "instance", "batch_size": 1},
    }
    design = parse_design(
        {
            "looks": [3, 5],
            "margin": 0.03,
            "questions": {"hd": {**sides, "metric": "val_hd95"}, "dice": sides},
        },
        "study",
    )
    assert [q.margin for q in design.questions] == [1.0, 0.03]


def test_the_quick_study_declares_valid_questions_in_few_looks():
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        full = compose("train", overrides=["experiment=norm_sweep_quick"], return_hydra_config=True)
    design = parse_design(OmegaConf.to_container(full.hydra.sweeper.study, resolve=True), "study")
    assert 2 <= design.m <= 6 and len(design.looks) >= 2
