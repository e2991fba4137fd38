"""Seeds in rounds: a group-sequential design whose verdicts stay valid however often the study looks.

A study declares its questions (questions.py) and its looks before it runs: after n_1 < n_2 < ... < n_K seeds
(seeds 0 .. n_k - 1) it tests every question. The family-wise error rate alpha is spent across the looks by a
spending function (Lan & DeMets 1983): look k may spend alpha(t_k) - alpha(t_(k-1)), t_k = n_k / n_K, and
each of the m questions gets an equal share of it. A question's verdict is read off its two-sided interval at
that level (verdicts.verdict: better / worse when it excludes 0, equivalent when it lies inside ±margin), and
the first look that decides a question fixes its verdict; later looks do not revisit it. The study stops when
every question is decided, at the last look, or at its wall-time cap.

Why this is valid under repeated looks: a wrong verdict needs an interval that misses the true difference at
some look, and look k's m intervals each miss with probability at most alpha_k / m, so the chance of any wrong
verdict, over every question and every look, is at most the sum of the alpha_k = alpha (Bonferroni over looks
and questions: the repeated confidence intervals of Jennison & Turnbull, Group Sequential Methods, 2000,
ch. 9, with a union bound instead of the joint distribution of the looks). It holds whatever the correlation
between looks, for all three verdicts, and for stopping early; it gives up the power that exact
group-sequential boundaries gain from that correlation. Holm's step-down is not used: it frees the alpha of
a decided question for the others, which is valid when a decision can only be a rejection of "no
difference", but an "equivalent" verdict is a decision too, and freeing its alpha lets the family's error
exceed alpha. tests/report/test_sequential.py simulates null studies through this procedure.

Pocock-type spending (the default) spends early, so a large effect is decided at the first look; O'Brien &
Fleming's keeps almost all of alpha for the last look.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from norm_experiments.errors import UserError
from norm_experiments.report.model import Estimate, Scores, paired
from norm_experiments.report.power import POWER, decide_probability, normal_cdf, normal_quantile
from norm_experiments.report.questions import Question, only_seeds, parse_questions
from norm_experiments.report.stats import t_cdf
from norm_experiments.report.verdicts import ALPHA, DEFAULT_MARGIN, Verdict, verdict

MAX_LOOKS = 10
MAX_SEEDS = 1000


def _pocock(alpha: float, t: float) -> float:
    return alpha * math.log(1.0 + (math.e - 1.0) * t)


def _obrien_fleming(alpha: float, t: float) -> float:
    return 2.0 - 2.0 * normal_cdf(normal_quantile(1.0 - alpha / 2.0) / math.sqrt(t)) if t > 0 else 0.0


def _linear(alpha: float, t: float) -> float:
    return alpha * t


SPENDING = {"pocock": _pocock, "obrien_fleming": _obrien_fleming, "linear": _linear}


@dataclass(frozen=True)
class Design:
    """The questions, the seeds at each look, and how alpha is spent over the looks."""

    questions: tuple[Question, ...]
    looks: tuple[int, ...]  # cumulative seeds at each look (seeds 0 .. n - 1)
    alpha: float = ALPHA
    spending: str = "pocock"
    margin: float = DEFAULT_MARGIN  # the questions' default margin
    max_minutes: float | None = None  # no new look starts after this much wall time

    @property
    def m(self) -> int:
        return len(self.questions)

    def spent(self, k: int) -> float:
        """alpha spent up to and including look k (0-based)."""
        t = self.looks[k] / self.looks[-1]
        return self.alpha if k == len(self.looks) - 1 else SPENDING[self.spending](self.alpha, t)

    def alpha_at(self, k: int) -> float:
        """alpha spent at look k alone."""
        return self.spent(k) - (self.spent(k - 1) if k else 0.0)

    def level(self, k: int) -> float:
        """Each question's two-sided level at look k: its interval has coverage 1 - level."""
        return self.alpha_at(k) / self.m

    def seeds(self, k: int) -> set[int]:
        return set(range(self.looks[k]))

    def describe(self) -> str:
        looks = ", ".join(
            f"{n} seeds (α {self.alpha_at(k):.4g}, {self.level(k):.3g} per question)"
            for k, n in enumerate(self.looks)
        )
        cap = f"; no new look after {self.max_minutes:g} min" if self.max_minutes else ""
        return (
            f"{len(self.looks)} look(s) at {looks}; α = {self.alpha} family-wise over the {self.m} questions "
            f"and every look, spent by the {self.spending.replace('_', '-')} spending function (Lan & "
            f"DeMets), each look's share split equally between the questions{cap}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "looks": list(self.looks),
            "spending": self.spending,
            "margin": self.margin,
            "max_minutes": self.max_minutes,
            "questions": {q.name: q.as_dict() for q in self.questions},
        }


def _number(raw: Any, key: str, where: str, low: float, high: float) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not low < raw < high:
        raise UserError(f"{where}.{key}: must be a number in ({low:g}, {high:g}), got {raw!r}"[:300])
    return float(raw)


def parse_design(raw: Any, where: str) -> Design:
    """A Design from its plain mapping (the sweeper's `study` config, or study.json); UserError naming the
    key that is wrong."""
    keys = ("alpha", "looks", "spending", "margin", "max_minutes", "questions")
    if not isinstance(raw, dict):
        raise UserError(f"{where}: must be a mapping with {', '.join(keys)}")
    unknown = [str(k) for k in raw if k not in keys]
    if unknown:
        raise UserError(f"{where}: unknown key '{unknown[0]}'; valid: {', '.join(keys)}")
    alpha = _number(raw.get("alpha", ALPHA), "alpha", where, 0.0, 0.5)
    margin = _number(raw.get("margin", DEFAULT_MARGIN), "margin", where, 0.0, math.inf)
    looks = raw.get("looks")
    if (
        not isinstance(looks, list)
        or not 1 <= len(looks) <= MAX_LOOKS
        or any(isinstance(n, bool) or not isinstance(n, int) for n in looks)
        or looks[0] < 2
        or looks[-1] > MAX_SEEDS
        or any(b <= a for a, b in zip(looks, looks[1:]))
    ):
        raise UserError(
            f"{where}.looks: must be 1 to {MAX_LOOKS} increasing seed counts from 2 to {MAX_SEEDS} "
            f"(e.g. [6, 10, 14]), got {looks!r}"[:300]
        )
    spending = raw.get("spending", "pocock")
    if spending not in SPENDING:
        raise UserError(f"{where}.spending: must be one of {', '.join(SPENDING)}, got {spending!r}"[:300])
    cap = raw.get("max_minutes")
    cap = None if cap is None else _number(cap, "max_minutes", where, 0.0, 10**7)
    questions = parse_questions(raw.get("questions"), margin, f"{where}.questions")
    return Design(tuple(questions), tuple(looks), alpha, spending, margin, cap)


@dataclass(frozen=True)
class Look:
    """One question at one look."""

    k: int
    seeds: int  # seeds both sides have among the look's seeds
    level: float
    estimate: Estimate | None
    a_mean: float
    b_mean: float
    verdict: Verdict

    @property
    def interval(self) -> tuple[float, float] | None:
        """The two-sided (1 - level) interval the verdict is read off (None: untestable)."""
        if self.estimate is None:
            return None
        half = self.estimate.half_width(self.level)
        return self.estimate.mean - half, self.estimate.mean + half


def decides(estimate: Estimate, level: float, margin: float, lower_is_better: bool = False) -> Verdict:
    """The verdict of the (1 - level) interval, from t probabilities instead of quantiles (fast enough to
    simulate thousands of studies); the same verdict as verdicts.verdict on the printed interval."""
    if estimate.se == 0.0:
        return verdict(estimate.mean, estimate.mean, margin, lower_is_better)
    if estimate.p_value < level:
        higher = estimate.mean > 0
        return Verdict.BETTER if higher != lower_is_better else Verdict.WORSE
    room = (margin - abs(estimate.mean)) / estimate.se  # interval inside ±margin: t quantile < room
    if room > 0 and 1.0 - t_cdf(room, estimate.df) < level / 2.0:
        return Verdict.EQUIVALENT
    return Verdict.INCONCLUSIVE


def look_at(question: Question, a: Scores, b: Scores, design: Design, k: int) -> Look:
    seeds = design.seeds(k)
    found = paired(only_seeds(a, seeds), only_seeds(b, seeds))
    level = design.level(k)
    if found is None or found.estimate is None:
        a_mean = found.a_mean if found else math.nan
        b_mean = found.b_mean if found else math.nan
        return Look(k, found.n_seeds if found else 0, level, None, a_mean, b_mean, Verdict.UNTESTABLE)
    call = decides(found.estimate, level, question.margin, question.lower_is_better)
    return Look(k, found.n_seeds, level, found.estimate, found.a_mean, found.b_mean, call)


@dataclass
class Answer:
    """One question through the looks the runs allow: decided at its first deciding look, else open."""

    question: Question
    looks: list[Look] = field(default_factory=list)

    @property
    def deciding(self) -> Look | None:
        return next((look for look in self.looks if look.verdict not in _OPEN), None)

    @property
    def final(self) -> Look | None:
        """The deciding look, else the last look taken (None when no look was possible)."""
        return self.deciding or (self.looks[-1] if self.looks else None)

    @property
    def decided(self) -> bool:
        return self.deciding is not None


_OPEN = (Verdict.INCONCLUSIVE, Verdict.UNTESTABLE)


def looks_available(design: Design, seeds_done: set[int]) -> int:
    """How many looks the finished seeds allow (a look needs every one of its seeds finished)."""
    return sum(1 for k in range(len(design.looks)) if design.seeds(k) <= seeds_done)


def answer(design: Design, question: Question, a: Scores, b: Scores, n_looks: int) -> Answer:
    """The question at looks 0 .. n_looks - 1, stopping at the first that decides."""
    found = Answer(question)
    for k in range(n_looks):
        found.looks.append(look_at(question, a, b, design, k))
        if found.decided:
            break
    return found


def projected(estimate: Estimate, seeds: int) -> tuple[float, float]:
    """(SE, df) the same estimator is expected to give with `seeds` seeds and the same cases, from the
    variance components of `estimate` (model.py); seeds-only estimates scale as 1 / sqrt(seeds)."""
    if estimate.mean_squares is None:
        se = estimate.se * math.sqrt(estimate.n_seeds / seeds)
        return se, float(seeds - 1)
    ms_seed, ms_case, ms_e = estimate.mean_squares
    s, c = estimate.n_seeds, estimate.n_cases
    var_seed = max(0.0, (ms_seed - ms_e) / c)
    var_case = max(0.0, (ms_case - ms_e) / s)
    e_seed = ms_e + c * var_seed  # expected mean squares at the new seed count
    e_case = ms_e + seeds * var_case
    combined = e_seed + e_case
    df = combined**2 / (e_seed**2 / (seeds - 1) + e_case**2 / (c - 1))
    return math.sqrt(combined / (seeds * c)), df


def seeds_to_decide(
    estimate: Estimate, level: float, margin: float, power: float = POWER, cap: int = 200
) -> int | None:
    """Fewest seeds at which a (1 - level) interval decides with probability `power`, if the true
    difference is the one observed and the variance components are those observed (None: not within cap).
    The case-to-case part of the variance does not shrink with seeds, so some questions need more cases."""
    for seeds in range(2, cap + 1):
        se, df = projected(estimate, seeds)
        if decide_probability(estimate.mean, se, df, level, margin) >= power:
            return seeds
    return None
