"""Filter Response Normalization with its Thresholded Linear Unit (Singh & Krishnan 2020), any spatial dims.

Per sample and channel: ν² = mean(x²) over the spatial axes, x̂ = x / sqrt(ν² + ε), y = γ·x̂ + β,
z = max(y, τ). No mean subtraction and no batch statistics; the TLU (learned τ) is the activation, so a
block using FRN must not add its own (NormSpec.includes_activation is True). Public implementations
(timm) are 2D only.
"""

from __future__ import annotations

import torch
from torch import nn

from norm_experiments.norms.bn_common import channel_view
from norm_experiments.norms.options import Option, eps, flag
from norm_experiments.norms.registry import NormRecord, register


class FilterResponseNorm(nn.Module):
    """FRN + TLU for (N, C, *spatial) input (the project uses N, C, D, H, W).

    learnable_eps: learn ε as eps + |ε_l| (ε_l starts at 0), which the paper uses where the spatial extent
    is tiny (1x1); off by default, so ε is the constant `eps`.
    """

    def __init__(self, num_features: int, eps: float = 1e-6, learnable_eps: bool = False) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))  # γ
        self.bias = nn.Parameter(torch.zeros(num_features))  # β
        self.tau = nn.Parameter(torch.zeros(num_features))  # TLU threshold τ
        self.eps_learned = nn.Parameter(torch.zeros(1)) if learnable_eps else None

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, learnable_eps={self.eps_learned is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3:
            raise ValueError(f"FilterResponseNorm expects (N, C, *spatial) input, got shape {tuple(x.shape)}")
        eps = self.eps if self.eps_learned is None else self.eps + self.eps_learned.abs()
        # ν² in float32: squares of fp16 activations overflow under AMP.
        nu2 = x.float().pow(2).mean(dim=list(range(2, x.dim())), keepdim=True)
        x_hat = x * torch.rsqrt(nu2 + eps)
        y = channel_view(self.weight, x) * x_hat + channel_view(self.bias, x)
        return torch.maximum(y, channel_view(self.tau, x)).to(x.dtype)


RECORD = register(
    NormRecord(
        name="frn",
        summary="mean(x²) over D×H×W per sample and channel, with its TLU as the activation",
        build=lambda c, o: FilterResponseNorm(c, eps=o["eps"], learnable_eps=o["learnable_eps"]),
        options={"eps": eps(1e-6), "learnable_eps": Option(False, flag)},
        includes_activation=True,
        spellings=("filterresponsenorm",),
    )
)
