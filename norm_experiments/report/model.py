"""Estimates with two levels of noise: seeds (training runs) and validation cases.

Every run of a study validates on the same cases, so seeds and cases are crossed: each (seed, case) pair has
one score. A paired difference a - b is taken per (seed, case) and modelled as

    d_sc = mu + seed_s + case_c + e_sc      (seed_s, case_c, e_sc independent, mean 0, variances
                                             var_seed, var_case, var_e)

and the mean over S seeds and C cases has variance var_seed/S + var_case/C + var_e/(S C). With the two-way
ANOVA mean squares (E[MS_seed] = var_e + C var_seed, E[MS_case] = var_e + S var_case):

    SE^2 = (MS_seed + MS_case) / (S C),   df = (MS_seed + MS_case)^2 / (MS_seed^2/(S-1) + MS_case^2/(C-1))

(Satterthwaite 1946), floored at MS_e / (S C) with df = (S-1)(C-1) (MS_e: the seed x case residual mean
square). Its expectation is the variance plus var_e/(S C): conservative (at most twice the variance, when
seed and case effects are absent), never negative, and its df stay between min(S-1, C-1) and S+C-2. The unbiased version subtracts MS_e; its Satterthwaite df then collapse towards 1 whenever the seed and
case components are small, and its intervals become dozens of times too wide. A t-distribution with those df
gives the intervals and p-values. With one case, or with records that keep no per-case scores, it is the
paired t-test over seeds. docs/explanation/statistics.md says why this model and not a bootstrap (3 seeds
give a bootstrap 10 distinct resamples and too narrow intervals).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from norm_experiments.report.stats import mean, sample_std, t_quantile, t_two_sided_p

SEEDS_AND_CASES = "seeds × cases"
SEEDS_ONLY = "seeds only"
CASES_ONLY = "cases of one model"
# Why a comparison fell back to seeds only (Estimate.seeds_only_because).
NO_CASE_SCORES = "records without per-case scores"
ONE_CASE = "records with one validation case"
DIFFERENT_CASES = "seeds that scored different validation cases, fewer than 2 of them in common"


@dataclass(frozen=True)
class Estimate:
    """A mean (of a cell, or of a paired difference) with its standard error and degrees of freedom."""

    mean: float
    se: float
    df: float
    n_seeds: int
    n_cases: int  # 0: from one value per seed (no per-case scores)
    # (MS_seed, MS_case, MS_e) of the crossed model: what a design with other seed counts would give
    mean_squares: tuple[float, float, float] | None = None
    # A seeds-only estimate where per-case scores were wanted: NO_CASE_SCORES, ONE_CASE or DIFFERENT_CASES.
    seeds_only_because: str | None = None

    @property
    def method(self) -> str:
        if self.n_seeds == 1:
            return CASES_ONLY
        return SEEDS_AND_CASES if self.n_cases else SEEDS_ONLY

    @property
    def p_value(self) -> float:
        """Two-sided p of mean = 0. Without any noise, a nonzero mean is certain and a zero one is not."""
        if self.se == 0.0:
            return 0.0 if self.mean != 0.0 else 1.0
        return t_two_sided_p(self.mean / self.se, self.df)

    def half_width(self, alpha: float) -> float:
        """Half-width of the two-sided (1 - alpha) interval."""
        return 0.0 if self.se == 0.0 else t_quantile(1.0 - alpha / 2.0, self.df) * self.se


def seed_estimate(values: Sequence[float]) -> Estimate | None:
    """One value per seed: mean, s / sqrt(n), df = n - 1 (None below 2 seeds)."""
    n = len(values)
    if n < 2:
        return None
    return Estimate(mean(values), sample_std(values) / math.sqrt(n), n - 1, n, 0)


def case_estimate(differences: Sequence[float]) -> Estimate | None:
    """One trained model, one value per validation case (norm-exp-check): the paired t over cases (None below
    2 cases)."""
    n = len(differences)
    if n < 2:
        return None
    return Estimate(mean(differences), sample_std(differences) / math.sqrt(n), n - 1, 1, n)


def crossed_estimate(grid: Sequence[Sequence[float]]) -> Estimate | None:
    """Rows = seeds, columns = cases (the same cases in every row). None below 2 seeds; one case: seed_estimate."""
    s = len(grid)
    c = len(grid[0]) if grid else 0
    if s < 2:
        return None
    if c < 2:
        return seed_estimate([row[0] for row in grid])
    grand = math.fsum(v for row in grid for v in row) / (s * c)
    seed_means = [math.fsum(row) / c for row in grid]
    case_means = [math.fsum(row[j] for row in grid) / s for j in range(c)]
    ms_seed = c * math.fsum((m - grand) ** 2 for m in seed_means) / (s - 1)
    ms_case = s * math.fsum((m - grand) ** 2 for m in case_means) / (c - 1)
    residual = math.fsum(
        (grid[i][j] - seed_means[i] - case_means[j] + grand) ** 2 for i in range(s) for j in range(c)
    )
    df_e = (s - 1) * (c - 1)
    ms_e = residual / df_e
    combined = ms_seed + ms_case
    if combined <= ms_e:  # seed and case effects smaller than the noise between them: the noise is the floor
        if ms_e == 0.0:  # every difference the same: no noise; the df do not matter
            return Estimate(grand, 0.0, float(df_e), s, c, (ms_seed, ms_case, ms_e))
        combined, df = ms_e, float(df_e)
    else:
        df = combined**2 / (ms_seed**2 / (s - 1) + ms_case**2 / (c - 1))
    return Estimate(grand, math.sqrt(combined / (s * c)), df, s, c, (ms_seed, ms_case, ms_e))


@dataclass
class Scores:
    """What a cell (or one BatchNorm evaluation mode of it) scored: per seed, and per seed and case."""

    by_seed: dict[int, float] = field(default_factory=dict)  # the value the record states for the run
    by_case: dict[int, dict[str, float]] = field(default_factory=dict)  # seeds that kept per-case scores


@dataclass(frozen=True)
class Paired:
    """a - b over the seeds (and cases) both have: the estimate (None: < 2 seeds) and the two means."""

    estimate: Estimate | None
    a_mean: float
    b_mean: float
    n_seeds: int


def _case_grid(a: Scores, b: Scores | None, seeds: list[int]) -> tuple[list[str], str]:
    """The cases every shared seed scored on both sides, and why a list of fewer than 2 (no use for the
    crossed model) is short: NO_CASE_SCORES (a seed kept none), ONE_CASE, or DIFFERENT_CASES."""
    sides = [a] if b is None else [a, b]
    if not seeds or not all(s in side.by_case for side in sides for s in seeds):
        return [], NO_CASE_SCORES
    scored = [frozenset(side.by_case[s]) for side in sides for s in seeds]
    common = frozenset.intersection(*scored)
    if len(set(scored)) > 1:
        return sorted(common), DIFFERENT_CASES
    return sorted(common), ONE_CASE if common else NO_CASE_SCORES


def paired(a: Scores, b: Scores | None = None) -> Paired | None:
    """a - b (or a alone when b is None) over shared seeds, from per-case scores where every shared seed
    has at least 2 common cases, else from the per-seed values. None when no seed is shared."""
    zero: Mapping[int, float] = {}
    seeds = sorted(set(a.by_seed) & (set(a.by_seed) if b is None else set(b.by_seed)))
    if not seeds:
        return None
    b_seed = zero if b is None else b.by_seed
    cases, short = _case_grid(a, b, seeds)
    if len(cases) >= 2:
        a_grid = [[a.by_case[s][c] for c in cases] for s in seeds]
        b_grid = [[0.0] * len(cases) if b is None else [b.by_case[s][c] for c in cases] for s in seeds]
        diff = [[x - y for x, y in zip(ra, rb)] for ra, rb in zip(a_grid, b_grid)]
        a_mean = mean([v for row in a_grid for v in row])
        b_mean = mean([v for row in b_grid for v in row])
        return Paired(crossed_estimate(diff), a_mean, b_mean, len(seeds))
    a_values = [a.by_seed[s] for s in seeds]
    b_values = [b_seed.get(s, 0.0) for s in seeds]
    diffs = [x - y for x, y in zip(a_values, b_values)]
    estimate = seed_estimate(diffs)
    if estimate is not None:
        estimate = replace(estimate, seeds_only_because=short)
    return Paired(estimate, mean(a_values), mean(b_values), len(seeds))
