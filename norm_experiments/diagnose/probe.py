"""Probing BatchNorm layers without changing them: which layers there are, their inputs' shapes and per-channel
statistics as BatchNorm computes them, forwards that stop at a layer, and the gap tables both diagnosing commands
print. Used by norm-exp-explain and norm-exp-check (neither command imports the other)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from norm_experiments.norms import bn_eval_mode, is_batch_stat_layer
from norm_experiments.norms.bn_common import reduce_dims

Stats = tuple[torch.Tensor, torch.Tensor]  # per-channel (mean, unbiased variance) of one layer's input
Shape = tuple[int, ...]


def bn_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if is_batch_stat_layer(m)}


@contextmanager
def pre_hooks(model: nn.Module, names: list[str], record) -> Iterator[None]:
    """Call record(name, input) before each named BN layer runs. record must return None: a pre-hook's
    return value would replace the layer's input."""
    layers = bn_layers(model)
    handles = [layers[n].register_forward_pre_hook(lambda _m, args, n=n: record(n, args[0])) for n in names]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _StopForward(Exception):
    """Raised after the deepest layer measured: later layers cannot change its input."""


def _stop(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    raise _StopForward


def forward_until(model: nn.Module, images: torch.Tensor, last: nn.Module) -> None:
    """Run the model up to `last` only: the decoder costs more than the encoder and changes nothing shown."""
    handle = last.register_forward_hook(_stop)
    try:
        model(images)
    except _StopForward:
        pass
    finally:
        handle.remove()


def batch_stats(x: torch.Tensor) -> Stats:
    """Per-channel mean and unbiased variance over N×D×H×W, as BatchNorm computes (and stores) them."""
    var, mean = torch.var_mean(x.detach().float(), dim=reduce_dims(x), correction=1)
    return mean.cpu(), var.cpu()


@torch.no_grad()
def layer_shapes(model: nn.Module, images: torch.Tensor) -> dict[str, Shape]:
    """Input shape of every BN layer, in forward order. Eval mode: it works even where training would fail."""
    shapes: dict[str, Shape] = {}
    with pre_hooks(model, list(bn_layers(model)), lambda n, x: shapes.update({n: tuple(x.shape)})):
        with bn_eval_mode(model, "running"):
            model(images)
    return shapes


def gap(stats: Stats, layer: nn.Module) -> dict[str, float]:
    """Statistics of one batch (or one volume) against a BN layer's running statistics: means and variances
    averaged over channels; gaps per channel, in units of the running σ (σ²), then averaged over channels."""
    (mean_b, var_b), eps = stats, layer.eps
    mean_r, var_r = layer.running_mean.detach().float().cpu(), layer.running_var.detach().float().cpu()
    return {
        "batch_mean": mean_b.mean().item(),
        "running_mean": mean_r.mean().item(),
        "batch_var": var_b.mean().item(),
        "running_var": var_r.mean().item(),
        "mean_gap": ((mean_b - mean_r).abs() / (var_r + eps).sqrt()).mean().item(),
        "var_gap": ((var_b - var_r).abs() / (var_r + eps)).mean().item(),
    }


def table(title: str, header: list[str], rows: list[list[str]], note: str) -> str:
    """Plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([title, note, line(header), line(["-" * w for w in widths]), *map(line, rows)])


def gap_table(gaps: dict[str, dict[str, float]], title: str, row: str = "BN layer", of: str = "B") -> str:
    """One row per entry of `gaps` (rows of gap(): a layer's, or a volume's, statistics against running
    statistics); `of` subscripts the compared statistics (B: a batch, v: a volume)."""
    keys = ["batch_mean", "running_mean", "batch_var", "running_var"]
    rows = [
        [name, *(f"{g[k]:.3g}" for k in keys), f"{g['mean_gap']:.2f}", f"{g['var_gap']:.2f}"]
        for name, g in gaps.items()
    ]
    return table(
        title,
        [row, f"mean μ_{of}", "running μ", f"var σ²_{of}", "running σ²", f"|μ_{of}−μ|/σ", f"|σ²_{of}−σ²|/σ²"],
        rows,
        "means and variances averaged over channels; gaps computed per channel, then averaged",
    )
