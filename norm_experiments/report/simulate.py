"""Simulated studies: what a sequential design does when the truth is known.

Each question's paired differences are drawn from the crossed model of model.py,

    d_sc = delta + seed_s + case_c + e_sc,   seed_s ~ N(0, var_seed), case_c ~ N(0, var_case), e_sc ~ N(0, var_e)

(the validation cases are drawn once per study, as a study's validation set is), and the study goes through
exactly the code the report and the sweeper use (sequential.answer). This gives the design's error rate
under repeated looks, its chance to decide every question, and the seeds it uses: the test of the procedure
(tests/report/test_sequential.py) and the sizing of the presets (scripts/plan_study.py).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from norm_experiments.report.model import Estimate, Scores
from norm_experiments.report.sequential import Answer, Design, answer
from norm_experiments.report.verdicts import Verdict


@dataclass(frozen=True)
class Truth:
    """One question's true difference and variance components."""

    delta: float
    var_seed: float
    var_case: float
    var_e: float


def truth_from(estimate: Estimate) -> Truth:
    """The observed difference and variance components (method of moments, negative ones set to 0)."""
    if estimate.mean_squares is None:  # one value per seed: all of it is seed-to-seed
        return Truth(estimate.mean, estimate.se**2 * estimate.n_seeds, 0.0, 0.0)
    ms_seed, ms_case, ms_e = estimate.mean_squares
    s, c = estimate.n_seeds, estimate.n_cases
    return Truth(estimate.mean, max(0.0, (ms_seed - ms_e) / c), max(0.0, (ms_case - ms_e) / s), ms_e)


def draw(truth: Truth, seeds: int, cases: int, rng: random.Random) -> tuple[Scores, Scores]:
    """(a, b) with a - b the simulated differences (b is all zeros)."""
    seed_effects = [rng.gauss(0.0, math.sqrt(truth.var_seed)) for _ in range(seeds)]
    case_effects = [rng.gauss(0.0, math.sqrt(truth.var_case)) for _ in range(cases)]
    a, b = Scores(), Scores()
    for s in range(seeds):
        row = {
            f"case{c}": truth.delta
            + seed_effects[s]
            + case_effects[c]
            + rng.gauss(0.0, math.sqrt(truth.var_e))
            for c in range(cases)
        }
        a.by_case[s], a.by_seed[s] = row, math.fsum(row.values()) / cases
        b.by_case[s], b.by_seed[s] = dict.fromkeys(row, 0.0), 0.0
    return a, b


def wrong(found: Answer, truth: Truth) -> bool:
    """A verdict the truth contradicts: a difference where there is none or of the wrong sign, or
    'equivalent' where the difference is at least the margin."""
    look = found.final
    if look is None:
        return False
    if look.verdict in (Verdict.BETTER, Verdict.WORSE):
        higher = (look.verdict == Verdict.BETTER) != found.question.lower_is_better
        return truth.delta == 0 or higher != (truth.delta > 0)
    return look.verdict == Verdict.EQUIVALENT and abs(truth.delta) >= found.question.margin


@dataclass
class Operating:
    """What the design did over many simulated studies."""

    studies: int
    any_wrong: int = 0  # studies with at least one wrong verdict (the family-wise error)
    decided: list[int] | None = None  # per question: studies that decided it
    all_decided: int = 0
    seeds_used: int = 0  # summed over studies: the seeds of the look where the study stopped

    @property
    def error_rate(self) -> float:
        return self.any_wrong / self.studies

    def decided_rate(self, i: int) -> float:
        return (self.decided or [0])[i] / self.studies

    @property
    def all_decided_rate(self) -> float:
        return self.all_decided / self.studies

    @property
    def mean_seeds(self) -> float:
        return self.seeds_used / self.studies


def simulate(design: Design, truths: list[Truth], cases: int, studies: int, seed: int = 0) -> Operating:
    """Run `studies` simulated studies of `design` (one Truth per question, in the design's order)."""
    if len(truths) != design.m:
        raise ValueError("one Truth per question")
    rng = random.Random(seed)
    found = Operating(studies, decided=[0] * design.m)
    for _ in range(studies):
        drawn = [draw(t, design.looks[-1], cases, rng) for t in truths]
        answers = [answer(design, q, a, b, len(design.looks)) for q, (a, b) in zip(design.questions, drawn)]
        found.any_wrong += any(wrong(a, t) for a, t in zip(answers, truths))
        for i, a in enumerate(answers):
            found.decided[i] += a.decided  # type: ignore[index]
        if all(a.decided for a in answers):
            found.all_decided += 1
            found.seeds_used += design.looks[max(a.final.k for a in answers)]  # type: ignore[union-attr]
        else:
            found.seeds_used += design.looks[-1]
    return found
