"""trainer.runs_per_gpu: k runs share one GPU, each capped at its share of the GPU's memory, which must be free
when the run starts. The decision is tested on CPU with the numbers torch.cuda.mem_get_info would give (the
GPU is replaced by those numbers); the cap itself and the CLI's error run only on a GPU (marked cuda)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from norm_experiments.errors import UserError
from norm_experiments.training.build import CUDA_CONTEXT_BYTES, make_plan, memory_share, set_up_device
from tests.helpers import assert_clean_failure, compose_config, run_cli

GIB = 2**30
H100 = "GPU 0 (NVIDIA H100 80GB HBM3)"


def test_one_run_per_gpu_takes_the_whole_gpu_whatever_is_free() -> None:
    assert memory_share(1, free=0, total=80 * GIB, gpu=H100) == 1.0


@pytest.mark.parametrize("k", [2, 4, 8])
def test_k_shares_and_k_contexts_fill_the_gpu_exactly(k: int) -> None:
    total = 80 * GIB
    fraction = memory_share(k, free=total - CUDA_CONTEXT_BYTES, total=total, gpu=H100)
    assert k * (fraction * total + CUDA_CONTEXT_BYTES) == pytest.approx(total)
    assert fraction == pytest.approx((80 / k - 1) / 80)  # e.g. k = 2: 39 GiB of 80 per run


def test_the_last_of_k_runs_to_start_still_finds_its_share_free() -> None:
    """The other k - 1 runs hold their full share and context; this run's context is already counted."""
    total, k = 80 * GIB, 4
    share = memory_share(k, free=total, total=total, gpu=H100) * total
    free_for_the_last = total - (k - 1) * (share + CUDA_CONTEXT_BYTES) - CUDA_CONTEXT_BYTES
    assert memory_share(k, free=round(free_for_the_last), total=total, gpu=H100) == pytest.approx(
        share / total
    )


def test_a_gpu_already_in_use_is_refused_naming_gpu_free_memory_and_k() -> None:
    with pytest.raises(UserError) as err:
        memory_share(4, free=10 * GIB, total=80 * GIB, gpu=H100)
    message = str(err.value)
    assert message.startswith(
        "trainer.runs_per_gpu=4: GPU 0 (NVIDIA H100 80GB HBM3) has 10.0 GiB free of 80.0"
    )
    assert "19.0 GiB" in message  # the share each of the 4 runs needs
    assert "\n" not in message


def test_more_runs_than_the_gpu_has_room_for_contexts_is_refused() -> None:
    with pytest.raises(UserError, match=r"runs_per_gpu=100: .* needs its share, more than the GPU has"):
        memory_share(100, free=80 * GIB, total=80 * GIB, gpu=H100)


def test_runs_per_gpu_is_typed_and_has_no_effect_on_a_cpu() -> None:
    with pytest.raises(UserError, match="trainer.runs_per_gpu: must be a whole number >= 1, got 0"):
        make_plan(compose_config(["experiment=smoke", "trainer.runs_per_gpu=0"]))
    cfg = compose_config(["experiment=smoke", "trainer.device=cpu", "trainer.runs_per_gpu=4"])
    set_up_device(cfg, make_plan(cfg).device)  # nothing to share, nothing to check: no error


@pytest.mark.cuda
def test_a_run_cannot_allocate_beyond_its_share() -> None:
    device = torch.device("cuda", 0)
    cfg = compose_config(["experiment=smoke", "trainer.device=cuda", "trainer.runs_per_gpu=4"])
    try:
        set_up_device(cfg, device)
        total = torch.cuda.mem_get_info(device)[1]
        share = (total - 4 * CUDA_CONTEXT_BYTES) // 4
        kept = torch.empty(GIB, dtype=torch.uint8, device=device)  # well within the share
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(share + GIB, dtype=torch.uint8, device=device)
        del kept
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()


@pytest.mark.cuda
def test_too_many_runs_per_gpu_stop_before_training(tmp_path: Path) -> None:
    result = run_cli(["experiment=smoke", "trainer.device=cuda", "trainer.runs_per_gpu=1000"], cwd=tmp_path)
    assert_clean_failure(result, "error: trainer.runs_per_gpu=1000: GPU 0 (", "GiB free of")
