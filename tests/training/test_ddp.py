"""Several processes (torchrun, DistributedDataParallel) on CPU with gloo: a multi-GPU run, minus NCCL.

A 2-rank syncbatch run at batch size 1 is the 1-process BatchNorm run at batch size 2 (same volumes per step,
statistics over the global batch); rank 0 alone writes the outputs; metrics.json records per-GPU and global
batch sizes; SIGTERM stops every rank after the same step and the same command continues the run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from norm_experiments.models.unet import UNet3D
from norm_experiments.norms import make_norm_spec
from norm_experiments.training import distributed
from norm_experiments.training.build import Built, make_plan
from norm_experiments.training.loop import Run
from tests import helpers
from tests.helpers import compose_config, free_port, metrics_of, run_cli

# Subprocess runs of the real CLI or trainings: the full suite runs them, `pytest -m "not slow"` does not.
pytestmark = pytest.mark.slow

# One memory format everywhere: channels_last=auto picks channels_last_3d for the batch-2 run on a CPU but
# not for batch-1 ranks, and the two layouts round differently (beyond this file's tolerances after 16 steps).
# One memory format and PyTorch's own conv path at every batch size: the ranks' batch-1 convs and the single
# process's batch-2 convs then differ only in summation order, which the equivalence test below bounds.
SMOKE = [
    *helpers.SMOKE,
    "trainer.progress=log",
    "trainer.channels_last=false",
    "trainer.cpu_conv=torch",
]
# 16 steps at a global batch of 2, a checkpoint every 2 steps: time to be stopped in the middle. SGD, because
# AdamW's first steps are nearly sign(gradient) steps: a gradient component near zero whose sign flips with the
# summation order moves a weight by ~2 lr, and 16 such steps amplify rounding to ~1e-2 in the deepest layers.
BUDGET = ["trainer.samples=32", "trainer.checkpoint_every_samples=4", "optim=sgd"]
BN_STATS = ("running_mean", "running_var")
CLASSES = ("class1", "class2")  # the synthetic data's foreground classes


def torchrun_command(args: list[str], nproc: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_port",
        str(free_port()),
        "-m",
        "norm_experiments.train",
        *SMOKE,
        *args,
    ]


@pytest.fixture(scope="module")
def sync_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, subprocess.CompletedProcess]:
    """2 ranks x batch size 1 with SyncBatchNorm, stopped by SIGTERM after its first checkpoint, then
    continued by the same command: (run dir, output of the stopped launch, the continuing launch)."""
    cwd = tmp_path_factory.mktemp("ddp")
    run_dir = cwd / "run"
    command = torchrun_command(["norm=syncbatch", "data.batch_size=1", *BUDGET, f"hydra.run.dir={run_dir}"])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        command,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=env,
    )
    deadline = time.time() + 120
    while not (run_dir / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # as SLURM and Ctrl-C do: torchrun and every rank get it
    stopped, _ = proc.communicate(timeout=120)
    resumed = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    return run_dir, stopped, resumed


@pytest.fixture(scope="module")
def single_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 process x batch size 2 with BatchNorm, the same seed: the run sync_run should reproduce."""
    cwd = tmp_path_factory.mktemp("single")
    args = [*SMOKE, "norm=batch", "data.batch_size=2", *BUDGET, f"hydra.run.dir={cwd / 'run'}"]
    result = run_cli(args, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "run"


def test_sigterm_stops_every_rank_after_the_same_step_and_the_same_command_continues(sync_run) -> None:
    run_dir, stopped, resumed = sync_run
    at_step = dict(re.findall(r"rank (\d): interrupted at step (\d+)", stopped))
    assert set(at_step) == {"0", "1"} and len(set(at_step.values())) == 1, stopped[-3000:]
    assert 0 < int(at_step["0"]) < 16
    assert "resuming" in (run_dir / "train.log").read_text()
    assert "Traceback" not in resumed.stdout + resumed.stderr


def test_ddp_run_records_batch_sizes_and_rank_0_alone_writes(sync_run) -> None:
    run_dir, _, resumed = sync_run
    metrics = metrics_of(run_dir)
    assert metrics["status"] == "completed" and metrics["world_size"] == 2
    assert metrics["batch_size"] == 1 and metrics["effective_batch"] == 1  # per GPU
    assert metrics["global_batch"] == 2 and metrics["bn_batch"] == 2  # syncbatch: statistics over both ranks
    assert metrics["samples_seen"] == 32 and metrics["steps"] == 16  # trainer.samples counts global patches
    assert set(metrics["eval_modes"]) == {"running", "precise", "batch"}
    # one set of outputs: one metrics.json, an event file and a log block per launch, Hydra's files once
    assert [p.name for p in run_dir.parent.rglob("metrics.json")] == ["metrics.json"]
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 2
    assert (run_dir / "train.log").read_text().count(" data: ") == 2
    for name in ("model.pt", "best_model.pt", "checkpoint.pt", "run_config.yaml", ".hydra/overrides.yaml"):
        assert (run_dir / name).exists(), name
    assert "world_size: 2" in (run_dir / "run_config.yaml").read_text()  # part of the run's identity
    assert (resumed.stdout + resumed.stderr).count("val_dice=") == 1  # the summary, from rank 0 only


def test_two_syncbatch_ranks_at_batch_1_train_as_batchnorm_at_batch_2(sync_run, single_run) -> None:
    """Same volumes per step, same statistics, same gradients: the same run up to float rounding, although
    the 2-rank run was stopped and continued.

    Rounding differences (sums in another order) are ~1e-7 after one step (see the next test), but AdamW's
    first steps are nearly sign(gradient) steps, so a gradient component near zero can flip and move a
    weight by ~2 lr; after 16 steps the running statistics agree to ~5e-4 (values ~0.2-1.4), not 1e-5.
    """
    ddp, single = metrics_of(sync_run[0]), metrics_of(single_run)
    assert single["world_size"] == 1 and single["global_batch"] == single["bn_batch"] == 2
    for a, b in zip(ddp["history"], single["history"], strict=True):
        assert a["step"] == b["step"] and a["samples_seen"] == b["samples_seen"]
        assert a["val_dice"] == pytest.approx(b["val_dice"], abs=1e-3)
    for mode in ("running", "precise", "batch"):
        assert ddp["eval_modes"][mode] == pytest.approx(single["eval_modes"][mode], abs=1e-3), mode
    # Per-case scores: each rank scored one of the 2 validation cases; both are in rank 0's record, in the
    # single process's order, with the single process's scores.
    assert set(ddp["per_case"]) == set(single["per_case"]) == {"running", "precise", "batch", "running_lcc"}
    for mode in ("running", "precise", "batch"):
        cases = ddp["per_case"][mode]
        assert list(cases) == list(single["per_case"][mode]) and len(cases) == 2, mode
        for name, scores in cases.items():
            for cls, dice in scores["dice"].items():
                assert dice == pytest.approx(single["per_case"][mode][name]["dice"][cls], abs=1e-2)
            # The error locations of rank 1's case reach rank 0's record too.
            assert scores["errors"]["fp_ml"] == pytest.approx(
                single["per_case"][mode][name]["errors"]["fp_ml"], rel=0.2, abs=1e-3
            )
        present = [
            [case["dice"][c] for case in cases.values() if case["dice"][c] is not None] for c in CLASSES
        ]
        means = [sum(values) / len(values) for values in present]
        assert sum(means) / 2 == pytest.approx(ddp["eval_modes"][mode], abs=1e-12), mode
    a, b = torch.load(sync_run[0] / "model.pt"), torch.load(single_run / "model.pt")
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith(BN_STATS):
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=key)


def _one_step_on_rank(rank: int, world: int, port: int, out: str) -> None:
    """One training forward/backward of rank `rank`'s slice of the global batch (spawned process)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    distributed.setup()
    try:
        model = _model("syncbatch")
        net = distributed.wrap_ddp(model, torch.device("cpu"))
        images, labels = _global_batch()
        F.cross_entropy(net(images[rank : rank + 1]), labels[rank : rank + 1]).backward()
        if rank == 0:
            grads = {name: p.grad for name, p in model.named_parameters()}
            torch.save({"state": model.state_dict(), "grads": grads, "sizes": _batch_sizes()}, out)
    finally:
        distributed.teardown()


def _batch_sizes() -> dict[str, tuple]:
    """(world_size, effective, global, bn batch, steps) a run of each norm records at data.batch_size=2."""
    sizes = {}
    for norm in ("group", "batch", "syncbatch", "ghostbatch"):
        cfg = compose_config(
            ["experiment=smoke", f"norm={norm}", "data.batch_size=2", "trainer.samples=16"]
            + (["norm.options.virtual_batch=1"] if norm == "ghostbatch" else [])
        )
        plan = make_plan(cfg)
        sizes[norm] = (
            plan.world_size,
            plan.effective_batch,
            plan.global_batch,
            plan.bn_batch,
            plan.total_steps,
        )
    return sizes


def _model(norm: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return UNet3D(make_norm_spec(norm), 1, 3, depth=2, base_channels=4).train()


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two volumes with different intensity gain and offset, as two scanners would give."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 1, 16, 16, 16, generator=g) * torch.tensor([0.5, 2.0]).view(2, 1, 1, 1, 1)
    images = images + torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1, 1)
    return images, torch.randint(0, 3, (2, 16, 16, 16), generator=g)


def test_one_synchronized_step_equals_batchnorm_on_the_global_batch(tmp_path: Path) -> None:
    """DDP + syncbatch over 2 ranks (1 volume each) vs BatchNorm on both volumes in one process: running
    statistics after the forward and every gradient after the backward agree to 1e-5. Also the batch sizes
    a 2-rank run records at data.batch_size=2 with a budget of 16 patches."""
    out = tmp_path / "rank0.pt"
    mp.spawn(_one_step_on_rank, args=(2, free_port(), str(out)), nprocs=2, join=True)
    ddp = torch.load(out)
    reference = _model("batch")
    images, labels = _global_batch()
    F.cross_entropy(reference(images), labels).backward()
    for key, value in reference.state_dict().items():
        if key.endswith(BN_STATS):
            torch.testing.assert_close(ddp["state"][key], value, atol=1e-5, rtol=0, msg=key)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(ddp["grads"][name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert ddp["sizes"] == {
        "group": (2, 2, 4, None, 4),  # batch-independent: no BatchNorm batch
        "batch": (2, 2, 4, 2, 4),  # BatchNorm sees its rank's 2 patches
        "syncbatch": (2, 2, 4, 4, 4),  # ... or all 4 when synchronized
        "ghostbatch": (2, 2, 4, 1, 4),  # ... or its virtual batch
    }


def _accumulated_steps_on_rank(rank: int, world: int, port: int, out: str) -> None:
    """Run.optimizer_step under DDP: 2 micro-batches of 1 volume on each rank, then a step of 1 micro-batch,
    counting DDP's gradient all-reduces (spawned process; float64, GroupNorm)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    distributed.setup()
    try:
        model = _group_model()
        net = distributed.wrap_ddp(model, torch.device("cpu"))
        reduced: list[int] = []

        def counting(state, bucket):
            reduced.append(bucket.index())
            return default_hooks.allreduce_hook(None, bucket)

        net.register_comm_hook(None, counting)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        built = Built(  # what optimizer_step uses: the real modules, optimizer, scaler and schedule
            cfg=None, plan=None, data=None, class_names=[], model=model, net=net, memory_format=None,
            renorm_layers=[], lr=0.1, optimizer=optimizer,
            scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), amp=None,
            scaler=torch.amp.GradScaler("cpu", enabled=False), loss_fn=torch.nn.CrossEntropyLoss(),
            sampler=None, inference=None,
        )  # fmt: skip
        run = Run(None, None, Path(out))  # type: ignore[arg-type]
        run.built = built
        images, labels = _four_volumes()
        mine = [(images[i : i + 1], labels[i : i + 1]) for i in (2 * rank, 2 * rank + 1)]
        run.optimizer_step(mine, 2)
        accumulated = len(reduced)
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        reduced.clear()
        run.optimizer_step(mine[:1], 1)
        if rank == 0:
            torch.save({"grads": grads, "accumulated": accumulated, "single": len(reduced)}, out)
    finally:
        distributed.teardown()


def _group_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return UNet3D(make_norm_spec("group", num_groups=2), 1, 3, depth=2, base_channels=4).double().train()


def _four_volumes() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    images = torch.randn(4, 1, 16, 16, 16, generator=g, dtype=torch.float64)
    return images, torch.randint(0, 3, (4, 16, 16, 16), generator=g)


def test_accumulation_under_ddp_all_reduces_once_per_step_and_averages_every_micro_batch(
    tmp_path: Path,
) -> None:
    """2 ranks x 2 accumulated micro-batches of 1 volume: the gradients of the mean loss over all 4 volumes
    (as one process with the 4 in one batch), with one all-reduce per optimizer step (no_sync() on the
    first micro-batch): a step of 2 micro-batches all-reduces as often as a step of 1."""
    out = tmp_path / "rank0.pt"
    mp.spawn(_accumulated_steps_on_rank, args=(2, free_port(), str(out)), nprocs=2, join=True)
    ddp = torch.load(out)
    assert ddp["single"] > 0 and ddp["accumulated"] == ddp["single"]
    reference = _group_model()
    images, labels = _four_volumes()
    F.cross_entropy(reference(images), labels).backward()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(ddp["grads"][name], p.grad, atol=1e-12, rtol=1e-9, msg=name)
