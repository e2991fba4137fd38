"""Probing BatchNorm layers without changing them: which layers there are, their inputs' per-channel statistics
as BatchNorm computes them, and forwards that stop at a layer. Used by norm-exp-explain and norm-exp-check."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from norm_experiments.norms import is_batch_stat_layer
from norm_experiments.norms.bn_common import reduce_dims

Stats = tuple[torch.Tensor, torch.Tensor]  # per-channel (mean, unbiased variance) of one layer's input


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
