"""PortableSyncBatchNorm in a real 2-process gloo group equals BatchNorm3d over the joined batch."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from norm_experiments.norms import PortableSyncBatchNorm

# Uneven local batches (1 and 3 samples): the global statistics must weight samples, not ranks.
SPLITS = [(0, 1), (1, 4)]


def joined_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    offsets = torch.randn(1, 3, 1, 1, 1, generator=generator) * 2
    return [torch.randn(4, 3, 4, 3, 5, generator=generator) + offsets for _ in range(2)]


def upstream_gradient(x: torch.Tensor) -> torch.Tensor:
    return torch.cos(torch.arange(x.numel(), dtype=x.dtype)).view_as(x)


def make_layer(layer_type: type[nn.Module]) -> nn.Module:
    layer = layer_type(3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return layer


def run_steps(
    layer: nn.Module, batches: list[torch.Tensor], start: int, stop: int
) -> dict[str, torch.Tensor]:
    """Two training steps and one eval forward on samples [start:stop] of the joined batches."""
    results: dict[str, torch.Tensor] = {}
    for step, joined in enumerate(batches):
        x = joined[start:stop].clone().requires_grad_()
        out = layer.train()(x)
        (out * upstream_gradient(joined)[start:stop]).sum().backward()
        results[f"out{step}"], results[f"grad{step}"] = out.detach(), x.grad
    results["weight_grad"], results["bias_grad"] = layer.weight.grad.clone(), layer.bias.grad.clone()
    results["running_mean"], results["running_var"] = layer.running_mean.clone(), layer.running_var.clone()
    results["eval"] = layer.eval()(batches[0][start:stop]).detach()
    return results


def worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        layer = make_layer(PortableSyncBatchNorm)
        results = run_steps(layer, joined_batches(), *SPLITS[rank])
        # Parameter gradients are per-rank partial sums (DDP would average them); sum to compare.
        for key in ("weight_grad", "bias_grad"):
            dist.all_reduce(results[key])
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sync_batchnorm_two_gloo_ranks_equal_batchnorm_on_joined_batch(tmp_path: Path) -> None:
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    expected = run_steps(make_layer(nn.BatchNorm3d), joined_batches(), 0, 4)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for key in ("out0", "grad0", "out1", "grad1", "eval"):
        joined = torch.cat([r[key] for r in ranks])
        torch.testing.assert_close(joined, expected[key], atol=1e-5, rtol=1e-5, msg=key)
    for rank_results in ranks:
        for key in ("weight_grad", "bias_grad", "running_mean", "running_var"):
            torch.testing.assert_close(rank_results[key], expected[key], atol=1e-5, rtol=1e-5, msg=key)
