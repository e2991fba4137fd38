"""BatchNorm's train/eval gap measured on a trained network, window by window (`norm-exp-explain trained=RUN`).

For each validation volume the run's own patch-sized windows (a grid that covers the volume) go through the
trained network one at a time, twice: as model.eval() runs it (running statistics) and with each window's
own statistics (the "batch" evaluation mode with one window, what BatchNorm saw in training at batch 1).
Per window and BatchNorm layer it records how far the window's own statistics, at the layer's input, lie
from the running statistics the layer normalizes with in model.eval():

    mean gap = mean over channels of |mu_w - mu_running| / sqrt(var_running + eps)
    var gap  = mean over channels of |var_w - var_running| / (var_running + eps)

and per window how the two forwards' predictions differ (the share of voxels whose class changes) and each
forward's Dice against the labels (windows that hold foreground). The tables then say which layers carry the
gap, whether a window's gap goes with its change of prediction (Spearman's rank correlation over windows,
with an interval from resampling whole volumes: windows of one volume are not independent of each other),
and which window contents (share of head voxels, share of foreground) carry both.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats
from torch import nn

from norm_experiments.diagnose.probe import bn_layers, pre_hooks, table
from norm_experiments.norms import bn_eval_mode
from norm_experiments.training.error_locations import head_mask

# Window contents by their share of head voxels (the image above a low threshold: error_locations.head_mask).
HEAD_GROUPS = (
    (0.0, 0.25, "under 25 % head"),
    (0.25, 0.75, "25-75 % head"),
    (0.75, 1.01, "75 % head and more"),
)


@dataclass
class Window:
    """One window of one validation volume, measured with running and with its own statistics."""

    case: str
    head_share: float
    fg_share: float
    mean_gap: dict[str, float]  # per BatchNorm layer
    var_gap: dict[str, float]
    changed: float  # share of the window's voxels whose predicted class differs between the two forwards
    dice_running: float | None  # mean Dice over the foreground classes the window holds (None: it holds none)
    dice_batch: float | None


@dataclass
class Measured:
    layers: list[str]
    windows: list[Window] = field(default_factory=list)
    intervals: dict[str, tuple[float, float]] | None = None  # rho_intervals at rho_level, once computed


def starts(size: int, window: int) -> list[int]:
    """Window starts that cover `size` voxels with windows of `window` (the last one ends at the edge)."""
    if size <= window:
        return [0]
    found = list(range(0, size - window + 1, window))
    return found if found[-1] == size - window else [*found, size - window]


def grid(shape: tuple[int, ...], window: tuple[int, ...]) -> Iterator[tuple[slice, slice, slice]]:
    for d in starts(shape[0], window[0]):
        for h in starts(shape[1], window[1]):
            for w in starts(shape[2], window[2]):
                yield slice(d, d + window[0]), slice(h, h + window[1]), slice(w, w + window[2])


def layer_gaps(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, float], dict[str, float], torch.Tensor]:
    """(mean gap, var gap) per BatchNorm layer of `model` for input `x` in model.eval(), and the logits."""
    layers = bn_layers(model)
    mean_gap: dict[str, float] = {}
    var_gap: dict[str, float] = {}

    def record(name: str, inp: torch.Tensor) -> None:
        layer = layers[name]
        dims = [0, *range(2, inp.dim())]
        mu, var = inp.mean(dims), inp.var(dims, unbiased=False)
        running_var = layer.running_var + layer.eps
        mean_gap[name] = float(((mu - layer.running_mean).abs() / running_var.sqrt()).mean())
        var_gap[name] = float(((var - layer.running_var).abs() / running_var).mean())

    with bn_eval_mode(model, "running"), pre_hooks(model, list(layers), record), torch.inference_mode():
        logits = model(x)
    return mean_gap, var_gap, logits


def window_dice(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> float | None:
    """Mean Dice over the foreground classes present in the window's labels (None: none present)."""
    scores = []
    for c in range(1, num_classes):
        truth = label == c
        if not truth.any():
            continue
        guess = pred == c
        scores.append(2.0 * float((truth & guess).sum()) / float(truth.sum() + guess.sum()))
    return sum(scores) / len(scores) if scores else None


def measure_volume(model: nn.Module, volume, window: tuple[int, ...], num_classes: int) -> list[Window]:
    """Every window of one volume (image (C, D, H, W), label (1, D, H, W) on the model's device)."""
    image, label = volume.image, volume.label[0]
    head = torch.from_numpy(head_mask(image[0].float().cpu().numpy()))
    found = []
    for where in grid(tuple(image.shape[1:]), window):
        x = image[(slice(None), *where)].unsqueeze(0)
        mean_gap, var_gap, logits = layer_gaps(model, x)
        with bn_eval_mode(model, "batch"), torch.inference_mode():
            own = model(x)
        running_pred, batch_pred = logits.argmax(1)[0].cpu(), own.argmax(1)[0].cpu()
        truth = label[where].long().cpu()
        found.append(
            Window(
                case=volume.name,
                head_share=float(head[where].float().mean()),
                fg_share=float((truth > 0).float().mean()),
                mean_gap=mean_gap,
                var_gap=var_gap,
                changed=float((running_pred != batch_pred).float().mean()),
                dice_running=window_dice(running_pred, truth, num_classes),
                dice_batch=window_dice(batch_pred, truth, num_classes),
            )
        )
    return found


def measure(model: nn.Module, volumes: list, window: tuple[int, ...], num_classes: int) -> Measured:
    found = Measured(list(bn_layers(model)))
    for volume in volumes:
        found.windows += measure_volume(model, volume, window, num_classes)
    return found


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def rank_correlation(a: list[float], b: list[float]) -> float:
    """Spearman's rho (nan when either side is constant or fewer than 3 windows)."""
    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return math.nan
    return float(stats.spearmanr(np.asarray(a), np.asarray(b)).statistic)


# Draws per layer in each tail of a Bonferroni-corrected interval: at 1000 draws and 10 layers each tail held 2.5
# draws, and the interval was the extreme draws. So the draws grow with the layers.
DRAWS_PER_TAIL = 25
BOOTSTRAP_SEED = 0  # the same run gives the same intervals
# Resampling fewer volumes than this gives intervals too narrow to claim a direction (a percentile bootstrap over
# 2-4 clusters): no interval then.
MIN_VOLUMES = 5


def bootstrap_draws(level: float) -> int:
    return max(1000, math.ceil(DRAWS_PER_TAIL / ((1 - level) / 2)))


def rho_intervals(found: Measured, level: float) -> dict[str, tuple[float, float]]:
    """Per layer, a percentile interval for Spearman's rho (mean gap vs change of prediction) from a bootstrap that
    resamples whole volumes (the windows of one volume share its anatomy and scanner, so resampling windows would
    claim too much). (nan, nan) with fewer than MIN_VOLUMES volumes or where the draws give no rho."""
    cases = sorted({w.case for w in found.windows})
    if len(cases) < MIN_VOLUMES or not found.layers:
        return {n: (math.nan, math.nan) for n in found.layers}
    # Per volume: its windows' gaps at every layer (windows x layers) and their change of prediction.
    gaps = {
        c: np.array([[w.mean_gap[n] for n in found.layers] for w in found.windows if w.case == c])
        for c in cases
    }
    moved = {c: np.array([w.changed for w in found.windows if w.case == c]) for c in cases}
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    draws = []
    for _ in range(bootstrap_draws(level)):
        picked = [cases[i] for i in rng.integers(len(cases), size=len(cases))]
        draws.append(
            _spearman_columns(
                np.concatenate([gaps[c] for c in picked]), np.concatenate([moved[c] for c in picked])
            )
        )
    rhos = np.array(draws)  # draws x layers; nan where a side was constant
    tail = 100 * (1 - level) / 2
    found_intervals = {}
    for j, name in enumerate(found.layers):
        column = rhos[:, j][~np.isnan(rhos[:, j])]
        found_intervals[name] = (
            tuple(float(v) for v in np.percentile(column, [tail, 100 - tail]))
            if column.size
            else (math.nan, math.nan)
        )
    return found_intervals  # type: ignore[return-value]


def _spearman_columns(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each column of x with y (average ranks for ties, as scipy's); nan for a constant side."""
    rx = stats.rankdata(x, axis=0)
    ry = stats.rankdata(y)
    rx, ry = rx - rx.mean(axis=0), ry - ry.mean()
    denominator = np.sqrt((rx**2).sum(axis=0) * (ry**2).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (rx * ry[:, None]).sum(axis=0) / denominator, np.nan)


def layer_intervals(found: Measured) -> dict[str, tuple[float, float]]:
    """rho_intervals at rho_level, computed once per measurement (both tables and the sentences read them)."""
    if found.intervals is None:
        found.intervals = rho_intervals(found, rho_level(found))
    return found.intervals


def rho_level(found: Measured) -> float:
    """The level of each layer's interval: 95 % over all layers together (Bonferroni)."""
    return 1 - 0.05 / max(len(found.layers), 1)


def _interval(bounds: tuple[float, float]) -> str:
    return "no interval" if math.isnan(bounds[0]) else f"[{bounds[0]:+.2f}, {bounds[1]:+.2f}]"


def layer_table(found: Measured) -> str:
    """Per layer: mean and var gap over windows, and their rank correlation with the change of prediction."""
    changed = [w.changed for w in found.windows]
    level = rho_level(found)
    intervals = layer_intervals(found)
    rows = []
    for name in found.layers:
        means = [w.mean_gap[name] for w in found.windows]
        variances = [w.var_gap[name] for w in found.windows]
        rows.append(
            [
                name,
                f"{_mean(means):.2f}σ",
                f"{_mean(variances):.2f}",
                f"{rank_correlation(means, changed):+.2f} {_interval(intervals[name])}",
                f"{rank_correlation(variances, changed):+.2f}",
            ]
        )
    volumes = len({w.case for w in found.windows})
    return table(
        f"T1. Each BatchNorm layer of the trained network: its running statistics against each window's own "
        f"({len(found.windows)} validation windows of {volumes} volumes)",
        ["BN layer", "|μ_w−μ|/σ", "|σ²_w−σ²|/σ²", "ρ(mean gap, changed) [interval]", "ρ(var gap, changed)"],
        rows,
        "gaps: mean over channels, then over windows; ρ: Spearman's rank correlation over windows with the share "
        "of the window's voxels whose class changes between running and own statistics; interval: "
        f"{100 * level:.1f} % each (95 % over the {len(found.layers)} layers together), percentiles of "
        f"{bootstrap_draws(level)} bootstrap draws of whole volumes (none with fewer than {MIN_VOLUMES} volumes)",
    )


def worst_layer(found: Measured) -> str:
    return max(found.layers, key=lambda n: _mean([w.mean_gap[n] for w in found.windows]))


def content_rows(found: Measured) -> list[tuple[str, int, float, float, float, float]]:
    """Per head-share group: (label, windows, mean gap at the worst layer, share of voxels changed, Dice with
    running statistics, Dice with the window's own statistics; the Dice means over windows with foreground)."""
    layer = worst_layer(found)
    rows = []
    for low, high, label in HEAD_GROUPS:
        group = [w for w in found.windows if low <= w.head_share < high]
        with_fg = [w for w in group if w.dice_running is not None]
        rows.append(
            (
                label,
                len(group),
                _mean([w.mean_gap[layer] for w in group]),
                _mean([w.changed for w in group]),
                _mean([w.dice_running for w in with_fg]),  # type: ignore[misc]
                _mean([w.dice_batch for w in with_fg]),  # type: ignore[misc]
            )
        )
    return rows


def content_table(found: Measured) -> str:
    layer = worst_layer(found)
    rows = [
        [
            label,
            str(n),
            _or_none(gap, "{:.2f}σ"),
            _or_none(100 * changed, "{:.1f} %"),
            _or_none(running, "{:.3f}"),
            _or_none(own, "{:.3f}"),
        ]
        for label, n, gap, changed, running, own in content_rows(found)
    ]
    return table(
        f"T2. What a window holds, its gap at {layer} (the layer with the largest mean gap), and what the gap "
        "does to its prediction",
        ["window content", "windows", "|μ_w−μ|/σ", "voxels changed", "Dice running", "Dice own statistics"],
        rows,
        "head: the image above a low threshold, holes filled; Dice: mean over the windows that hold foreground; "
        "none: no window of the row (holding foreground) to average",
    )


def _or_none(value: float, fmt: str) -> str:
    return "none" if math.isnan(value) else fmt.format(value)


def conclusion(found: Measured) -> list[str]:
    """Sentences computed from the two tables."""
    if not found.windows:
        return ["No window was measured."]
    changed = [w.changed for w in found.windows]
    gaps = {n: _mean([w.mean_gap[n] for w in found.windows]) for n in found.layers}
    rhos = {n: rank_correlation([w.mean_gap[n] for w in found.windows], changed) for n in found.layers}
    top, low = max(gaps, key=gaps.get), min(gaps, key=gaps.get)  # type: ignore[arg-type]
    lines = [
        f"- The running statistics sit farthest from the windows' own at {top} ({gaps[top]:.2f}σ of the running "
        f"standard deviation on average) and closest at {low} ({gaps[low]:.2f}σ).",
    ]
    ranked = sorted((rhos[n], n) for n in found.layers if not math.isnan(rhos[n]))
    if ranked:
        lines.append(trend_sentence(found, rhos, layer_intervals(found)))
    lines.append(
        f"- {100 * _mean(changed):.1f} % of all voxels change class between running and own statistics."
    )
    for label, n, gap, moved, running, own in content_rows(found):
        if n:
            dice = (
                ""
                if math.isnan(running)
                else f"; Dice {running:.3f} with running statistics, {own:.3f} with its own"
            )
            lines.append(
                f"- {label}: {n} windows, gap {gap:.2f}σ at {top}, {100 * moved:.1f} % of voxels changed{dice}."
            )
    return lines


def trend_sentence(found: Measured, rhos: dict[str, float], intervals: dict[str, tuple[float, float]]) -> str:
    """Whether windows with the larger gap change their prediction more or less: stated only for the layers whose
    interval (T1) excludes 0; the rest are inconclusive."""
    less = [n for n in found.layers if intervals[n][1] < 0]
    more = [n for n in found.layers if intervals[n][0] > 0]
    open_ = [n for n in found.layers if intervals[n][0] <= 0 <= intervals[n][1]]
    rest = len(found.layers) - len(less) - len(more) - len(open_)  # no interval
    ranked = sorted((rhos[n], n) for n in found.layers if not math.isnan(rhos[n]))
    (low_rho, low_name), (high_rho, high_name) = ranked[0], ranked[-1]
    parts = []
    if less:
        parts.append(
            f"at {len(less)} of {len(found.layers)} layers the windows with the larger gap change their prediction less"
        )
    if more:
        parts.append(
            f"at {len(more)} of {len(found.layers)} layers the windows with the larger gap change their prediction more"
        )
    if open_:
        parts.append(
            f"at {len(open_)} of {len(found.layers)} layers the direction is inconclusive (the interval includes 0)"
        )
    if rest:
        parts.append(
            f"at {rest} of {len(found.layers)} layers no direction is shown (no interval: fewer than {MIN_VOLUMES} "
            "volumes, or a side without spread)"
        )
    return (
        f"- Across the {len(found.windows)} windows of {len({w.case for w in found.windows})} volumes, "
        f"{'; '.join(parts)} (Spearman ρ from {low_rho:+.2f} at {low_name} to {high_rho:+.2f} at {high_name}; "
        "intervals in T1)."
    )
