"""Run.train_step keeps its per-step work small (no walk over every module) but still trains in training
mode and moves BatchRenorm's limits along the step budget; gradient accumulation (trainer.accumulate_steps)
is one optimizer step over k micro-batches, each normalized alone; the batch-statistics evaluation mode
forwards trainer.batch_stats_windows windows at a time."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.utils.tensorboard

from norm_experiments.norms import BNStatMonitor, renorm_layers
from norm_experiments.run_names import run_identity
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


@pytest.mark.cuda
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
    """A loss tensor that notes the step at which it is read back to the host (float() syncs with a GPU);
    sums of it (the logging window's loss) are read through it too."""

    reads: list[int] = []
    step = 0

    def __float__(self) -> float:
        type(self).reads.append(type(self).step)
        return super().__float__()


@pytest.mark.parametrize("progress", ["bar", "log", "none"])
def test_the_loss_is_read_back_only_at_logging_steps(tmp_path: Path, progress: str, monkeypatch) -> None:
    """Reading the loss waits for the GPU: whatever the progress display, only every log_every_steps (and at
    a checkpoint), never on the steps in between."""
    run = built_run(tmp_path, f"trainer.progress={progress}", "trainer.log_every_steps=4", "norm=group")
    real_step = run.optimizer_step

    def counted(*args):
        _CountedLoss.step += 1
        return real_step(*args).as_subclass(_CountedLoss)

    monkeypatch.setattr(run, "optimizer_step", counted)
    _CountedLoss.reads, _CountedLoss.step = [], 0
    steps = run.plan.total_steps  # 8 at the smoke budget; logging at 4 and 8, a checkpoint at 4
    monitor = BNStatMonitor(run.b.model)
    progress_display = Progress(steps, 0, progress, "test")
    writer = torch.utils.tensorboard.SummaryWriter(str(tmp_path / "tb"))
    run.loop(writer, monitor, progress_display, StopRequest(), InlineExecutor())
    progress_display.close()
    assert run.state.step == steps == 8
    assert set(_CountedLoss.reads) == {4, 8}, _CountedLoss.reads


# ------------------------------------------------------------------------------ gradient accumulation

ACCUMULATE = ["optim=sgd", "trainer.cpu_conv=torch", "trainer.channels_last=false", "trainer.num_threads=1"]


def _state(run: Run) -> dict:
    b = run.b
    return copy.deepcopy(
        {
            "model": b.model.state_dict(),
            "optimizer": b.optimizer.state_dict(),
            "sched": b.scheduler.state_dict(),
        }
    )


def _restore(run: Run, state: dict) -> None:
    b = run.b
    b.model.load_state_dict(state["model"])
    b.optimizer.load_state_dict(state["optimizer"])
    b.scheduler.load_state_dict(state["sched"])


def _step(run: Run, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, dict, dict]:
    """(loss, gradients, parameters) after one optimizer step over `micro`."""
    loss = run.optimizer_step(micro, len(micro))
    model = run.b.model
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return float(loss), grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def _two_micro_batches(run: Run) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [run.b.sampler.batch(m) for m in (0, 1)]  # micro-batches 0 and 1: optimizer step 0


def test_accumulating_k_micro_batches_is_one_batch_k_times_larger_for_a_batch_independent_norm(
    tmp_path: Path,
) -> None:
    """GroupNorm, 2 micro-batches of 1 patch vs the same 2 patches as one batch: the same loss, gradients and
    update (the loss is scaled by 1/k; DiceCE averages over patches). In float64: in float32 the two orders
    of summation differ by up to 1e-3 of a layer's largest gradient, which would hide a real difference."""
    run = built_run(tmp_path, "norm=group", "data.batch_size=1", "trainer.accumulate_steps=2", *ACCUMULATE)
    assert (run.plan.effective_batch, run.plan.global_batch, run.plan.accumulate_steps) == (1, 2, 2)
    run.b.model.double()  # the same Parameter objects: the optimizer keeps them
    micro = [(images.double(), labels) for images, labels in _two_micro_batches(run)]
    start = _state(run)
    accumulated = _step(run, micro)
    _restore(run, start)
    images, labels = (torch.cat(parts) for parts in zip(*micro))
    whole = _step(run, [(images, labels)])
    assert accumulated[0] == pytest.approx(whole[0], rel=1e-12)
    for name in whole[1]:
        torch.testing.assert_close(accumulated[1][name], whole[1][name], rtol=1e-9, atol=1e-12, msg=name)
        torch.testing.assert_close(accumulated[2][name], whole[2][name], rtol=1e-9, atol=1e-12, msg=name)
    _restore(run, start)
    first_only = _step(run, micro[:1])  # not what accumulation does: the second micro-batch counts
    assert any(not torch.allclose(first_only[1][n], whole[1][n], atol=1e-5) for n in whole[1])


def test_batchnorm_normalizes_each_micro_batch_alone(tmp_path: Path) -> None:
    """BatchNorm with 2 micro-batches of 1: its running statistics are updated once per micro-batch, and the
    gradients are not those of one batch of 2 (whose statistics would span both patches)."""
    run = built_run(tmp_path, "norm=batch", "data.batch_size=1", "trainer.accumulate_steps=2", *ACCUMULATE)
    assert run.plan.bn_batch == 1 and run.plan.global_batch == 2
    bn = [m for m in run.b.model.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    start, micro = _state(run), _two_micro_batches(run)
    accumulated = _step(run, micro)
    assert all(int(m.num_batches_tracked) == 2 for m in bn)
    _restore(run, start)
    images, labels = (torch.cat(parts) for parts in zip(*micro))
    whole = _step(run, [(images, labels)])
    assert all(int(m.num_batches_tracked) == 1 for m in bn)
    assert any(not torch.allclose(accumulated[1][n], whole[1][n], atol=1e-4) for n in whole[1])


def test_an_enabled_loss_scaler_gives_the_unscaled_accumulated_update(tmp_path: Path) -> None:
    """fp16's GradScaler with accumulation: every backward scaled, one unscale and step; the update equals
    the one without loss scaling (on a CPU the scaler is off by default: enable one to check the recipe)."""
    run = built_run(tmp_path, "norm=group", "data.batch_size=1", "trainer.accumulate_steps=2", *ACCUMULATE)
    start, micro = _state(run), _two_micro_batches(run)
    plain = _step(run, micro)
    _restore(run, start)
    run.b.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaled = _step(run, micro)
    assert run.b.scaler.get_scale() == 2.0**12 and run.state.amp_skipped_steps == 0
    for name in plain[2]:
        torch.testing.assert_close(scaled[1][name], plain[1][name], rtol=1e-4, atol=1e-7, msg=name)
        torch.testing.assert_close(scaled[2][name], plain[2][name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_loop_takes_k_micro_batches_per_step_and_counts_steps_and_patches(tmp_path: Path) -> None:
    """Step t trains on micro-batches t*k .. t*k+k-1 (also from a resumed step), the schedule steps once per
    optimizer step, and samples_seen counts every micro-batch's patches."""
    run = built_run(
        tmp_path, "norm=group", "data.batch_size=1", "trainer.accumulate_steps=2", "trainer.validations=1"
    )
    assert run.plan.total_steps == 8 and run.plan.ckpt_every == 4  # 16 patches, 8 per checkpoint
    drawn: list[int] = []
    real_batch = run.b.sampler.batch
    run.b.sampler.batch = lambda m: drawn.append(m) or real_batch(m)  # type: ignore[method-assign]
    run.state.step, run.state.samples_seen = 3, 6  # as a run resumed at step 3 would be
    run.b.scheduler.last_epoch = 3
    writer = torch.utils.tensorboard.SummaryWriter(str(tmp_path / "tb"))
    run.loop(
        writer, BNStatMonitor(run.b.model), Progress(8, 3, "none", "test"), StopRequest(), InlineExecutor()
    )
    assert drawn == list(range(6, 16))
    assert run.state.step == 8 and run.state.samples_seen == 16 and run.b.scheduler.last_epoch == 8
    assert [h["step"] for h in run.state.loss_history] == [4, 6, 8]  # smoke: log_every_steps=2


def test_windows_per_forward_in_the_batch_statistics_mode(batch_run: Run) -> None:
    """ "batch" mode forwards trainer.batch_stats_windows windows of a volume at a time (null: sw_batch_size,
    4); 1 scores each window alone; the running mode keeps sw_batch_size whatever the setting."""
    run, sizes = batch_run, []
    hook = run.b.model.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    default = run.b.inference
    try:
        evaluate_built(run.b, run.b.model, "batch")
        assert sizes == [4, 4] * len(run.b.data.val)  # 24^3 volumes, 16^3 windows, overlap 0.25: 8 windows
        run.b.inference = dataclasses.replace(default, batch_stats_windows=1)
        sizes.clear()
        alone = evaluate_built(run.b, run.b.model, "batch")
        assert sizes == [1] * 8 * len(run.b.data.val)
        sizes.clear()
        evaluate_built(run.b, run.b.model, "running")
        assert sizes == [4, 4] * len(run.b.data.val)
    finally:
        hook.remove()
        run.b.inference = default
    assert set(alone.per_case(run.b.class_names)) == {v.name for v in run.b.data.val}
