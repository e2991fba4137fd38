"""Run.train_step keeps its per-step work small (no walk over every module) but still trains in training
mode and moves BatchRenorm's limits along the step budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.utils.tensorboard

from norm_experiments.config import run_identity
from norm_experiments.norms import BNStatMonitor, renorm_layers
from norm_experiments.training.build import make_plan, use_channels_last
from norm_experiments.training.evaluate import evaluate_built
from norm_experiments.training.loop import Run
from norm_experiments.training.prefetch import InlineExecutor, prefetch_pool
from norm_experiments.training.progress import Progress
from norm_experiments.training.signals import StopRequest
from tests.helpers import built_run as build_run
from tests.helpers import compose_config


def built_run(tmp_path: Path, *overrides: str) -> Run:
    return build_run(tmp_path, ["experiment=smoke", "trainer.device=cpu", *overrides])


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One built BatchNorm run (smoke config) shared by the tests below: building costs seconds each time."""
    return built_run(tmp_path_factory.mktemp("batch-run"), "norm=batch")


@pytest.mark.parametrize("mode", ["running", "batch"])
def test_evaluation_leaves_every_module_in_training_mode(batch_run: Run, mode: str) -> None:
    """train_step only calls train() when the model is not in training mode: evaluation must restore it."""
    run = batch_run
    evaluate_built(run.b, run.b.model, mode)
    assert all(module.training for module in run.b.model.modules())
    assert all(m.track_running_stats for m in run.b.model.modules() if isinstance(m, torch.nn.BatchNorm3d))


def test_step_after_eval_mode_trains_in_training_mode(batch_run: Run) -> None:
    run = batch_run
    images, labels = run.b.sampler.batch(0)
    run.b.model.eval()  # whatever left the model in eval mode, the next step must train
    before = {name: buf.clone() for name, buf in run.b.model.named_buffers() if name.endswith("running_mean")}
    run.train_step(images, labels)
    assert all(module.training for module in run.b.model.modules())
    after = dict(run.b.model.named_buffers())
    assert any(not torch.equal(before[name], after[name]) for name in before)  # BN updated its statistics


def test_batchrenorm_limits_follow_the_step_budget(tmp_path: Path) -> None:
    run = built_run(tmp_path, "norm=batchrenorm")
    layers = renorm_layers(run.b.model)
    assert layers and run.plan.total_steps == 8  # 16 samples at batch 2
    images, labels = run.b.sampler.batch(0)
    run.train_step(images, labels)  # step 0 of 8: warm-up, plain BatchNorm
    assert all((layer.r_max, layer.d_max) == (1.0, 0.0) for layer in layers)
    run.state.step = 2  # progress 0.25: 3/8 of the way from warm-up (0.1) to relax_end (0.5)
    run.train_step(images, labels)
    expected = (1.0 + 2.0 * 0.375, 5.0 * 0.375)
    assert all((layer.r_max, layer.d_max) == pytest.approx(expected) for layer in layers)
    run.state.step = run.plan.total_steps - 1
    run.train_step(images, labels)
    assert all((layer.r_max, layer.d_max) == (3.0, 5.0) for layer in layers)


def test_prefetch_thread_runs_one_intra_op_thread() -> None:
    """The thread that cuts batches on CUDA must not start a second team of torch's size on the cores."""
    before = torch.get_num_threads()
    with prefetch_pool() as pool:
        assert pool.submit(torch.get_num_threads).result() == 1
        assert pool.submit(lambda: torch.ones(10**6).flip(0).sum().item()).result() == 10**6
        assert pool.submit(torch.get_num_threads).result() == 1  # still 1 after a real op
    assert torch.get_num_threads() == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on the CI machines)")
def test_volumes_cached_on_the_gpu_train_and_validate(tmp_path: Path) -> None:
    cfg = compose_config(["experiment=smoke", "trainer.device=cuda", "data.cache_on_device=true"])
    run = Run(cfg, make_plan(cfg), tmp_path)
    metrics = run.train()
    assert run.b.data.train[0].image.is_cuda and run.b.data.val[0].label.is_cuda
    assert metrics["status"] == "completed" and metrics["steps"] == run.plan.total_steps
    assert set(metrics["eval_modes"]) == {"running", "batch", "precise"}


def test_where_volumes_are_cached_is_not_part_of_a_runs_identity() -> None:
    """data.cache_on_device gives the same batches, so a run may resume with it switched (and keeps its folder)."""
    base = compose_config(["experiment=smoke"])
    assert run_identity(base) == run_identity(
        compose_config(["experiment=smoke", "data.cache_on_device=true"])
    )
    assert run_identity(base) != run_identity(compose_config(["experiment=smoke", "data.batch_size=1"]))


@pytest.mark.parametrize(
    ("setting", "device", "batch", "expected"),
    [
        ("auto", "cpu", 2, True),  # measured faster on a CPU at batch 2 for every norm (benchmark section c)
        ("auto", "cpu", 8, True),
        ("auto", "cpu", 1, False),  # batch 1 runs the depth split, which gains nothing from it
        ("auto", "cuda", 8, False),  # off on GPUs until measured there
        (True, "cuda", 1, True),
        (False, "cpu", 8, False),
    ],
)
def test_channels_last_is_on_where_it_was_measured_faster(setting, device, batch, expected) -> None:
    assert use_channels_last(setting, torch.device(device), batch) is expected


def test_default_cpu_run_trains_channels_last(batch_run: Run) -> None:
    run = batch_run
    assert run.b.memory_format == torch.channels_last_3d
    conv = next(m for m in run.b.model.modules() if isinstance(m, torch.nn.Conv3d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    images, labels = run.b.sampler.batch(0)
    loss = run.train_step(images.contiguous(memory_format=run.b.memory_format), labels)
    assert torch.isfinite(loss)


class _CountedLoss(torch.Tensor):
    """A loss tensor that counts how often it is read back to the host (float() syncs with a GPU)."""

    reads = 0

    def __float__(self) -> float:
        type(self).reads += 1
        return super().__float__()


@pytest.mark.parametrize("progress", ["bar", "log", "none"])
def test_the_loss_is_read_back_only_at_logging_steps(tmp_path: Path, progress: str, monkeypatch) -> None:
    """Reading the loss waits for the GPU: whatever the progress display, only every log_every_steps."""
    run = built_run(tmp_path, f"trainer.progress={progress}", "trainer.log_every_steps=4", "norm=group")
    real_step = run.train_step
    monkeypatch.setattr(run, "train_step", lambda x, y: real_step(x, y).as_subclass(_CountedLoss))
    _CountedLoss.reads = 0
    steps = run.plan.total_steps  # 8 at the smoke budget; logging at 4 and 8, a checkpoint at 4
    monitor = BNStatMonitor(run.b.model)
    progress_display = Progress(steps, 0, progress, "test")
    writer = torch.utils.tensorboard.SummaryWriter(str(tmp_path / "tb"))
    run.loop(writer, monitor, progress_display, StopRequest(), InlineExecutor())
    progress_display.close()
    assert run.state.step == steps == 8
    assert _CountedLoss.reads == 2
