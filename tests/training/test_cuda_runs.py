"""Training on a GPU (marked cuda: skipped without one; scripts/gpu_check.sh runs them): the record names the
run's own device and precision and its own peak memory, and trainer.deterministic=true repeats a run exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from norm_experiments.training.build import make_plan
from norm_experiments.training.loop import Run
from tests.helpers import compose_config

pytestmark = pytest.mark.cuda


def train(run_dir: Path, *overrides: str) -> tuple[Run, dict]:
    cfg = compose_config(["experiment=smoke", "trainer.device=cuda", *overrides])
    run = Run(cfg, make_plan(cfg), run_dir)
    record = run.train()
    assert record["status"] == "completed", record.get("error")
    return run, record


def test_a_gpu_run_records_its_device_precision_and_peak_memory(tmp_path: Path) -> None:
    record = train(tmp_path)[1]
    assert record["device"] == torch.cuda.get_device_name(0)
    assert record["amp"] == ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    assert record["peak_cuda_memory_mb"] > 0


def test_peak_memory_is_each_runs_own(tmp_path: Path) -> None:
    """Two runs in one process (a sweep without a parallel launcher): the second, smaller run does not
    report the first one's peak."""
    large = train(tmp_path / "large", "data.batch_size=8", "data.patches_per_volume=2")[1]
    small = train(tmp_path / "small", "data.batch_size=1")[1]
    assert 0 < small["peak_cuda_memory_mb"] < large["peak_cuda_memory_mb"]


def test_deterministic_runs_repeat_exactly(tmp_path: Path) -> None:
    (first, first_record), (second, second_record) = (
        train(tmp_path / name, "trainer.deterministic=true") for name in ("a", "b")
    )
    for (name, a), b in zip(first.b.model.state_dict().items(), second.b.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert first_record["val_dice"] == second_record["val_dice"]
