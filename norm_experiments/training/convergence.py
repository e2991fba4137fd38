"""Was a run still improving when its budget ran out? A trend test over the late part of its training loss.

The points are the mean training loss of each logging window (trainer.log_every_steps optimizer steps; see
Run.loop), taken from the last LATE_PART of the run. A least-squares line through them gives the slope and
its standard error from the scatter of the points around the line; the run is "still improving" when the
slope is significantly negative (one-sided t-test, df = points - 2, at ALPHA).

Why the training loss, for every norm: it is computed in training mode, so BatchNorm's evaluation mode
cannot distort it (validation Dice under running statistics can collapse at batch 1 while the network still
learns), and it has many points (a validation every 25 % of a run gives 3 points in the late half, too few
for a trend with an error). What it does not say: whether validation Dice would still rise.
"""

from __future__ import annotations

import math

from scipy import stats

# The part of a run the trend is fitted over. Not just the last interval: with a cosine schedule the learning
# rate is nearly 0 over the last quarter, so a flat last quarter says little about whether more steps help.
LATE_PART = 0.5
ALPHA = 0.05  # one-sided level of the slope test
MIN_POINTS = 3  # a line through 2 points has no scatter to estimate its error from
METRIC = "train_loss"


def trend(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope of ys over xs and its standard error (needs >= 3 points and distinct xs)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    residual = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys))
    return slope, math.sqrt(residual / (n - 2) / sxx)


def convergence(loss_history: list[dict], total_steps: int) -> dict | None:
    """The convergence record of a run from its logged training losses ({"step", "loss"}, loss None where
    it was not finite). None when the late part holds fewer than MIN_POINTS finite points.

    slope: change of the loss per whole run (x = step / total_steps), so runs of different lengths compare;
    se: its standard error; t = slope / se; p: one-sided p-value of "the loss still falls"."""
    start = total_steps * (1 - LATE_PART)
    late = [h for h in loss_history if h["step"] >= start and h["loss"] is not None]
    xs = [h["step"] / total_steps for h in late]
    if len(late) < MIN_POINTS or len(set(xs)) < 2:
        return None
    slope, se = trend(xs, [h["loss"] for h in late])
    df = len(late) - 2
    if se > 0:
        t = slope / se
        p = float(stats.t.cdf(t, df))  # small when the slope is clearly negative
    else:  # points exactly on a line: the sign decides
        t = -math.inf if slope < 0 else (math.inf if slope > 0 else 0.0)
        p = 0.0 if slope < 0 else 1.0
    return {
        "metric": METRIC,
        "still_improving": bool(p < ALPHA),
        "slope": slope,
        "se": se,
        "t": t if math.isfinite(t) else None,
        "p": p,
        "points": len(late),
        "since_fraction": late[0]["step"] / total_steps,  # the fit starts this far into the run
        "alpha": ALPHA,
    }
