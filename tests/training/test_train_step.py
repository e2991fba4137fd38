"""Run.train_step keeps its per-step work small (no walk over every module) but still trains in training
mode and moves BatchRenorm's limits along the step budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from norm_experiments.norms import renorm_layers
from norm_experiments.training.loop import Run
from tests.helpers import compose_config


def built_run(tmp_path: Path, *overrides: str) -> Run:
    run = Run(compose_config(["experiment=smoke", "trainer.device=cpu", *overrides]), tmp_path)
    run.build()
    return run


def test_step_after_evaluation_trains_in_training_mode(tmp_path: Path) -> None:
    run = built_run(tmp_path, "norm=batch")
    images, labels = run.sampler.batch(0)
    run.evaluate(run.model)
    run.model.eval()  # whatever left the model in eval mode, the next step must train
    before = {name: buf.clone() for name, buf in run.model.named_buffers() if name.endswith("running_mean")}
    run.train_step(images, labels)
    assert all(module.training for module in run.model.modules())
    after = dict(run.model.named_buffers())
    assert any(not torch.equal(before[name], after[name]) for name in before)  # BN updated its statistics


def test_batchrenorm_limits_follow_the_step_budget(tmp_path: Path) -> None:
    run = built_run(tmp_path, "norm=batchrenorm")
    layers = renorm_layers(run.model)
    assert layers and run.total_steps == 8  # 16 samples at batch 2
    images, labels = run.sampler.batch(0)
    run.train_step(images, labels)  # step 0 of 8: warm-up, plain BatchNorm
    assert all((layer.r_max, layer.d_max) == (1.0, 0.0) for layer in layers)
    run.state.step = 2  # progress 0.25: 3/8 of the way from warm-up (0.1) to relax_end (0.5)
    run.train_step(images, labels)
    expected = (1.0 + 2.0 * 0.375, 5.0 * 0.375)
    assert all((layer.r_max, layer.d_max) == pytest.approx(expected) for layer in layers)
    run.state.step = run.total_steps - 1
    run.train_step(images, labels)
    assert all((layer.r_max, layer.d_max) == (3.0, 5.0) for layer in layers)
