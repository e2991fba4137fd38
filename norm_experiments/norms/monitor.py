"""How far each BN layer's batch statistics are from its running statistics during training.

This gap is what eval mode gets wrong: training normalizes with batch statistics, eval with the running
ones. At batch size 1 with per-volume intensity shifts the gap stays large; with GroupNorm there is none.
"""

from __future__ import annotations

import torch
from torch import nn

from norm_experiments.norms.bn_common import reduce_dims, tracks_running_stats


class BNStatMonitor:
    """Forward pre-hooks on every BN-family layer with running statistics; train-mode forwards only.

    Per forward and layer, with μ_B, σ²_B the batch statistics (unbiased variance, as BN stores it) and
    μ, σ² the running statistics *before* this batch updates them, averaged over channels:
      ``<layer>/mean_gap`` = mean |μ_B - μ| / sqrt(σ² + eps)   (shift in running-std units)
      ``<layer>/var_gap``  = mean |σ²_B - σ²| / (σ² + eps)     (relative variance error)
    For GhostBatchNorm the batch statistics are those of the whole batch, not of its virtual batches.
    ``pop()`` returns the averages since the previous pop. Set ``enabled = False`` to skip the extra
    reductions on steps that are not logged.
    """

    def __init__(self, model: nn.Module) -> None:
        self.enabled = True
        # Sums stay on the device (no host sync per step); pop() reads them once.
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._hooks = [
            module.register_forward_pre_hook(self._make_hook(name))
            for name, module in model.named_modules()
            if tracks_running_stats(module)
        ]

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            # track_running_stats is off in bn_eval_mode("batch") and recompute_bn_statistics.
            if self.enabled and module.training and module.track_running_stats:
                self._record(name or "bn", module, args[0])

        return hook

    @torch.no_grad()
    def _record(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        var, mean = torch.var_mean(x.detach().float(), dim=reduce_dims(x), correction=1)
        running_var = module.running_var.float() + module.eps
        mean_gap = ((mean - module.running_mean.float()).abs() / running_var.sqrt()).mean()
        var_gap = ((var - module.running_var.float()).abs() / running_var).mean()
        gaps = torch.stack([mean_gap, var_gap])
        self._sums[name] = self._sums[name] + gaps if name in self._sums else gaps
        self._counts[name] = self._counts.get(name, 0) + 1

    def pop(self) -> dict[str, float]:
        """Average gaps per layer since the last pop (keys ``<layer>/mean_gap``, ``/var_gap``); {} if none."""
        result: dict[str, float] = {}
        for name, sums in self._sums.items():
            mean_gap, var_gap = (sums / self._counts[name]).tolist()
            result[f"{name}/mean_gap"] = mean_gap
            result[f"{name}/var_gap"] = var_gap
        self._sums.clear()
        self._counts.clear()
        return result

    def close(self) -> None:
        """Remove the hooks."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
