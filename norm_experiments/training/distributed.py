"""Several processes, one per GPU, started by torchrun: process group, rank queries and small collectives.

    torchrun --nproc_per_node=4 -m norm_experiments.train norm=syncbatch data.batch_size=1

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; `setup()` joins the process group when WORLD_SIZE > 1 and
does nothing otherwise, so every helper below also works (trivially) in a single process. Collectives on
CUDA tensors go through NCCL, those on CPU tensors through gloo (backend "cpu:gloo,cuda:nccl" on a GPU
machine, plain gloo without one). The small control collectives here (stop flag, Dice sums, barrier) use
CPU tensors, so they never wait on the GPU stream.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from norm_experiments.errors import UserError
from norm_experiments.norms import PortableSyncBatchNorm

# One single-rank group per process, for evaluating with local batch statistics (see local_batch_statistics).
_local_group: dist.ProcessGroup | None = None


def started_by_torchrun() -> bool:
    return all(key in os.environ for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def setup() -> None:
    """Join the process group of a torchrun launch with WORLD_SIZE > 1; a no-op in a single process."""
    global _local_group
    if not started_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1 or dist.is_initialized():
        return
    backend = "gloo"
    if torch.cuda.is_available() and dist.is_nccl_available():
        if local_rank() >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise UserError(
                f"torchrun started more processes on this node than the {count} visible GPUs "
                f"(LOCAL_RANK={local_rank()}); use --nproc_per_node={count} or fewer"
            )
        torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend)
    # new_subgroups is collective: every rank creates every one-rank group, in the same order.
    _local_group, _ = dist.new_subgroups(group_size=1)


def teardown() -> None:
    global _local_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _local_group = None


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's GPU index on its node (torchrun's LOCAL_RANK); 0 in a single process."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that writes the run's outputs and logs."""
    return rank() == 0


def _cpu_all_reduce(tensor: torch.Tensor, op=None) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    """Wait until every rank gets here (a CPU all-reduce through gloo: no GPU device to guess)."""
    _cpu_all_reduce(torch.zeros(1))


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (e.g. a stop request that reached one rank)."""
    return bool(_cpu_all_reduce(torch.tensor([int(flag)]), dist.ReduceOp.MAX).item())


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks of a CPU tensor (a new tensor; the input is not changed)."""
    return _cpu_all_reduce(tensor.detach().cpu().clone())


def same_on_all_ranks(value: object) -> bool:
    """Whether every rank passed an equal (picklable) value."""
    if not is_distributed():
        return True
    values: list[object] = [None] * world_size()
    dist.all_gather_object(values, value)
    return all(v == values[0] for v in values)


def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics...) to every rank.

    DDP broadcasts them at the start of each training forward, but each rank's own last forward then updates
    its copy with its local batch; evaluation and checkpoints must all use one model: rank 0's.
    """
    if is_distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


class _DDP(DistributedDataParallel):
    """DistributedDataParallel that accepts PortableSyncBatchNorm in a CPU module.

    DDP refuses every SyncBatchNorm on CPU because torch's kernels are CUDA-only; our layer has a CPU (gloo)
    path. On GPUs torch's own check runs unchanged.
    """

    def _passing_sync_batchnorm_handle(self, module: nn.Module) -> None:
        if self.device_type != "cpu":
            return super()._passing_sync_batchnorm_handle(module)
        for layer in module.modules():
            if isinstance(layer, nn.SyncBatchNorm) and not isinstance(layer, PortableSyncBatchNorm):
                raise UserError(
                    "torch.nn.SyncBatchNorm (MONAI networks' norm=syncbatch) runs on GPUs only; "
                    "on CPU use model=unet, whose syncbatch layers also run there"
                )


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` wrapped for training under DDP (gradients averaged over ranks); `model` itself when alone."""
    if not is_distributed():
        return model
    return _DDP(model, device_ids=[device] if device.type == "cuda" else None)  # CPU (gloo): no device_ids


def shard(items: list) -> list:
    """This rank's share of `items`: every world_size-th one, starting at its rank."""
    return items[rank() :: world_size()]


@contextlib.contextmanager
def local_batch_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Sync BatchNorm layers normalize with this rank's batch only (no collective in their forward).

    For evaluation, where ranks run different numbers of forwards on different volumes: a synchronized
    train-mode forward (bn_eval_mode "batch") would wait forever for the other ranks. Each forward then
    normalizes with its own statistics, as it does in a single process.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)] if is_distributed() else []
    groups = [layer.process_group for layer in layers]
    try:
        for layer in layers:
            layer.process_group = _local_group  # world size 1: the layer behaves as BatchNorm
        yield model
    finally:
        for layer, group in zip(layers, groups, strict=True):
            layer.process_group = group
