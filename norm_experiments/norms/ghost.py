"""Ghost (virtual) BatchNorm: batch statistics over sub-batches of a fixed size, whatever the batch size.

In training, the batch is split along N into chunks of ``virtual_batch`` samples (the last one may be
smaller); each chunk is normalized with its own statistics and updates the running statistics once, so
one optimizer batch of N samples moves the running averages ceil(N / virtual_batch) times. Eval uses the
running statistics like BatchNorm. virtual_batch >= N is exactly BatchNorm; virtual_batch = 1 gives every
sample its own statistics (InstanceNorm-like in training, BatchNorm-like in eval).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from norm_experiments.norms.bn_common import running_update_factor
from norm_experiments.norms.options import Option, count, eps, running_momentum
from norm_experiments.norms.registry import NormRecord, register


class GhostBatchNorm(_BatchNorm):
    """BatchNorm with training statistics over virtual batches of `virtual_batch` samples (N, C, *spatial)."""

    def __init__(
        self, num_features: int, virtual_batch: int = 2, eps: float = 1e-5, momentum: float | None = 0.1
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True, track_running_stats=True)
        if virtual_batch < 1:
            raise ValueError(f"virtual_batch must be >= 1, got {virtual_batch}")
        self.virtual_batch = virtual_batch

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"GhostBatchNorm expects (N, C, *spatial) input, got shape {tuple(input.shape)}")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch={self.virtual_batch}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            return super().forward(x)
        return torch.cat([self._chunk_forward(chunk) for chunk in x.split(self.virtual_batch)], dim=0)

    def _chunk_forward(self, chunk: torch.Tensor) -> torch.Tensor:
        if not self.track_running_stats:
            # Batch statistics without touching running stats (bn_eval_mode("batch")).
            return F.batch_norm(chunk, None, None, self.weight, self.bias, True, 0.0, self.eps)
        # F.batch_norm updates the running buffers in place, one chunk after the other.
        factor = running_update_factor(self)
        return F.batch_norm(
            chunk, self.running_mean, self.running_var, self.weight, self.bias, True, factor, self.eps
        )


RECORD = register(
    NormRecord(
        name="ghostbatch",
        summary="BatchNorm over virtual sub-batches of virtual_batch samples",
        build=lambda c, o: GhostBatchNorm(c, o["virtual_batch"], eps=o["eps"], momentum=o["momentum"]),
        options={"eps": eps(), "momentum": running_momentum(), "virtual_batch": Option(2, count)},
        batch_dependent=True,
        bn_family=True,
        statistic_batch=lambda rank_patches, all_patches, o: min(o["virtual_batch"], rank_patches),
        spellings=("ghostbatchnorm", "ghostbn"),
    )
)
