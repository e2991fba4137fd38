"""Batch Renormalization (Ioffe 2017), with its r_max/d_max schedule expressed as fractions of the run.

Training forward, per channel (μ_B, σ_B: batch statistics; μ, σ: running statistics, σ = sqrt(var + eps)):

    r = stopgrad(clip(σ_B / σ, 1/r_max, r_max))
    d = stopgrad(clip((μ_B - μ) / σ, -d_max, d_max))
    y = γ · ((x - μ_B) / σ_B · r + d) + β

With r_max = 1 and d_max = 0 this is exactly BatchNorm. Running mean/var are updated as in PyTorch's
BatchNorm (momentum, unbiased variance; the paper updates σ instead of σ², a negligible difference), and
evaluation uses them like BatchNorm. No PyTorch or MONAI implementation exists.

Why fractions: the paper keeps plain BN for 5k steps and relaxes until 25k-40k steps; a short 3D run with
a few thousand steps would never leave plain BN. So the schedule is plain BN until ``warmup_fraction`` of
the step budget, then r_max and d_max rise linearly to their targets by ``relax_end_fraction`` (one end
for both; the paper's d_max finishes earlier than r_max, a detail not worth a second knob here).
The training loop calls ``set_progress(step / total_steps)`` on every layer ``renorm_layers(model)`` found
once at build time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from norm_experiments.errors import UserError
from norm_experiments.norms.bn_common import channel_view, reduce_dims, update_running_stats
from norm_experiments.norms.options import (
    Option,
    at_least,
    eps,
    fraction_of_budget,
    option_key,
    running_momentum,
)
from norm_experiments.norms.registry import NormRecord, register


@dataclass(frozen=True)
class RenormSchedule:
    """r_max/d_max as a function of training progress (fraction of the step budget done, 0..1)."""

    r_max: float = 3.0
    d_max: float = 5.0
    warmup_fraction: float = 0.1
    relax_end_fraction: float = 0.5

    def limits(self, progress: float) -> tuple[float, float]:
        """(r_max, d_max) in effect at `progress`: (1, 0) during warm-up, then linear to the targets."""
        if progress < self.warmup_fraction:
            relaxed = 0.0
        elif progress >= self.relax_end_fraction:
            relaxed = 1.0
        else:
            relaxed = (progress - self.warmup_fraction) / (self.relax_end_fraction - self.warmup_fraction)
        return 1.0 + (self.r_max - 1.0) * relaxed, self.d_max * relaxed


class BatchRenorm(_BatchNorm):
    """Batch Renormalization for (N, C, *spatial) input (the project uses 3D: N, C, D, H, W).

    Starts as plain BatchNorm (progress 0); call ``set_progress`` (or ``set_renorm_progress`` on the
    model) to move along the schedule. With track_running_stats switched off (as ``bn_eval_mode("batch")``
    does) it normalizes with batch statistics only, like BatchNorm does.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        schedule: RenormSchedule | None = None,
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True, track_running_stats=True)
        self.schedule = schedule or RenormSchedule()
        self.r_max, self.d_max = self.schedule.limits(0.0)
        # (mean r, mean |d|, fraction of channels clipped) of the last training forward, kept on device
        # so that reading it (renorm_diagnostics) is the only host sync.
        self.last_stats: torch.Tensor | None = None

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"BatchRenorm expects (N, C, *spatial) input, got shape {tuple(input.shape)}")

    def set_progress(self, progress: float) -> None:
        """Set the current r_max/d_max from the fraction of the step budget done."""
        self.r_max, self.d_max = self.schedule.limits(progress)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if self.training and self.track_running_stats:
            return self._renorm_forward(x)
        # Eval (running stats), or batch statistics only: exactly BatchNorm's paths.
        return super().forward(x)

    def _renorm_forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32 even under AMP (fp16 sums of squares overflow), output in the input's dtype.
        batch_var, batch_mean = torch.var_mean(x.float(), dim=reduce_dims(x), correction=0)
        batch_std = torch.sqrt(batch_var + self.eps)
        r, d = self._correction(batch_mean.detach(), batch_std.detach())
        # y = (x - μ_B) · (γ r / σ_B) + (β + γ d): per-channel factors first keeps one full-size temporary.
        scale = self.weight * r / batch_std
        shift = self.bias + self.weight * d
        y = (x - channel_view(batch_mean, x)) * channel_view(scale, x) + channel_view(shift, x)
        update_running_stats(self, batch_mean, batch_var, x.numel() // x.shape[1])
        return y.to(x.dtype)

    def _correction(
        self, batch_mean: torch.Tensor, batch_std: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """r and d from detached batch statistics (no gradient flows through them, as in the paper)."""
        running_std = torch.sqrt(self.running_var + self.eps)
        raw_r = batch_std / running_std
        raw_d = (batch_mean - self.running_mean) / running_std
        r = raw_r.clamp(1.0 / self.r_max, self.r_max)
        d = raw_d.clamp(-self.d_max, self.d_max)
        clipped = (r != raw_r) | (d != raw_d)
        self.last_stats = torch.stack([r.mean(), d.abs().mean(), clipped.float().mean()]).detach()
        return r, d


def make_batch_renorm(num_features: int, options: dict) -> BatchRenorm:
    """BatchRenorm from resolved NormSpec options (eps, momentum, r_max, d_max, schedule fractions)."""
    schedule = RenormSchedule(
        r_max=options["r_max"],
        d_max=options["d_max"],
        warmup_fraction=options["warmup_fraction"],
        relax_end_fraction=options["relax_end_fraction"],
    )
    return BatchRenorm(num_features, eps=options["eps"], momentum=options["momentum"], schedule=schedule)


def renorm_layers(model: nn.Module) -> list[BatchRenorm]:
    """Every BatchRenorm layer in `model` (a training loop finds them once instead of walking every step)."""
    return [module for module in model.modules() if isinstance(module, BatchRenorm)]


def set_renorm_progress(model: nn.Module, progress: float) -> None:
    """Set r_max/d_max of every BatchRenorm layer in `model`; progress = fraction of steps done (0..1)."""
    progress = min(max(float(progress), 0.0), 1.0)
    for layer in renorm_layers(model):
        layer.set_progress(progress)


def renorm_diagnostics(model: nn.Module) -> dict[str, float]:
    """Per BatchRenorm layer, from its last training forward: mean r, mean |d|, clipped fraction, limits.

    Keys are ``<module name>/r_mean``, ``/d_abs_mean`` (mean |d|: signed d averages out across channels),
    ``/clip_fraction`` (channels whose raw r or d fell outside the current limits; 1.0 while r_max=1 means
    plain BN), ``/r_max`` and ``/d_max``. Layers that have not run a training forward are left out.
    """
    diagnostics: dict[str, float] = {}
    for name, module in model.named_modules():
        if not isinstance(module, BatchRenorm) or module.last_stats is None:
            continue
        r_mean, d_abs_mean, clip_fraction = module.last_stats.tolist()
        prefix = name or "batchrenorm"
        diagnostics[f"{prefix}/r_mean"] = r_mean
        diagnostics[f"{prefix}/d_abs_mean"] = d_abs_mean
        diagnostics[f"{prefix}/clip_fraction"] = clip_fraction
        diagnostics[f"{prefix}/r_max"] = module.r_max
        diagnostics[f"{prefix}/d_max"] = module.d_max
    return diagnostics


def _check_schedule(options: dict) -> None:
    if options["warmup_fraction"] > options["relax_end_fraction"]:
        raise UserError(
            f"{option_key('warmup_fraction')}={options['warmup_fraction']} must not exceed "
            f"{option_key('relax_end_fraction')}={options['relax_end_fraction']}"
        )


RECORD = register(
    NormRecord(
        name="batchrenorm",
        summary="as batch, with the r/d correction towards running statistics",
        build=make_batch_renorm,
        options={
            "eps": eps(),
            "momentum": running_momentum(),
            "r_max": Option(3.0, at_least(1, "1 means plain BatchNorm")),
            "d_max": Option(5.0, at_least(0, "0 means plain BatchNorm")),
            # Schedule fractions are of the run's step budget; see RenormSchedule.
            "warmup_fraction": Option(0.1, fraction_of_budget),
            "relax_end_fraction": Option(0.5, fraction_of_budget),
        },
        batch_dependent=True,
        bn_family=True,
        check=_check_schedule,
        spellings=("batchrenormalization", "brn"),
    )
)
