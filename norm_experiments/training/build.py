"""From a config to everything a run trains with: the plan (sizes, budget, device; cheap, no data) and the
built parts (data, model, optimizer, schedule, precision, batches, inference).

    plan = make_plan(cfg)               # validates the config; raises UserError naming the key
    built = build(cfg, plan)            # loads the data and builds the model; build(cfg, plan, data) reuses data

Used by training (training/loop.py), norm-exp-explain and scripts/benchmark.py.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from norm_experiments.config import validate_config
from norm_experiments.data.pipeline import BatchSampler, DataBundle, keep_on_device, load_data
from norm_experiments.errors import UserError
from norm_experiments.models import build_model, median_spacing
from norm_experiments.models.preflight import preflight
from norm_experiments.norms import NormSpec, make_norm_spec, renorm_layers
from norm_experiments.norms.cpu_conv import set_cpu_conv
from norm_experiments.run_names import run_identity
from norm_experiments.training import distributed
from norm_experiments.training.evaluate import Inference


@dataclass(frozen=True)
class Plan:
    """What a config asks for, checked: the norm, the batch sizes, the budget and the device."""

    run_id: str  # hash of the config without execution-only keys (run_names.run_identity)
    spec: NormSpec
    world_size: int  # processes (GPUs) of a torchrun launch; 1 otherwise
    effective_batch: int  # patches per rank and forward (micro-batch): what a plain BatchNorm layer sees
    accumulate_steps: int  # micro-batches whose gradients add up to one optimizer step
    global_batch: int  # patches per optimizer step over all ranks and micro-batches: what the budget counts
    bn_batch: int | None  # patches each training-mode batch statistic is computed over (None: none)
    total_steps: int
    val_steps: frozenset[int]  # the steps after which the run validates
    ckpt_every: int  # steps between checkpoints
    device: torch.device


def make_plan(cfg: DictConfig, job_num: int = 0) -> Plan:
    """Validate the config and work out sizes, budget and device. Under torchrun the number of processes
    becomes part of the config (2 GPUs x batch 1 is not the run 1 GPU x batch 1).

    A step is one optimizer step: trainer.accumulate_steps micro-batches of data.batch_size volumes per rank.
    The budget, the schedule, validations, checkpoints and logging count these steps; BatchNorm sees one
    micro-batch per forward."""
    validate_config(cfg)
    world_size = distributed.world_size()
    if world_size > 1:
        with open_dict(cfg):
            cfg.trainer.world_size = world_size
    spec, effective, bn_batch = network_plan(cfg, world_size)
    accumulate = int(cfg.trainer.accumulate_steps)
    global_batch = effective * world_size * accumulate
    total = budget_steps(cfg.trainer, global_batch)
    gpu_index = distributed.local_rank() if world_size > 1 else job_num
    return Plan(
        run_id=run_identity(cfg),
        spec=spec,
        world_size=world_size,
        effective_batch=effective,
        accumulate_steps=accumulate,
        global_batch=global_batch,
        bn_batch=bn_batch,
        total_steps=total,
        val_steps=validation_steps(total, int(cfg.trainer.validations)),
        ckpt_every=max(1, round(int(cfg.trainer.checkpoint_every_samples) / global_batch)),
        device=select_device(str(cfg.trainer.device), gpu_index),
    )


def network_plan(cfg: DictConfig, world_size: int = 1) -> tuple[NormSpec, int, int | None]:
    """(norm, patches per rank and forward, patches per batch statistic) of a config, with the model's
    feature maps checked against them (preflight): training's plan and norm-exp-check's network share it.
    data.batch_size counts per GPU; gradient accumulation adds no patches to a forward."""
    spec = make_norm_spec(str(cfg.norm.name), **OmegaConf.to_container(cfg.norm.options))  # type: ignore[arg-type]
    effective = int(cfg.data.batch_size) * int(cfg.data.patches_per_volume)
    bn_batch = spec.bn_batch(effective, effective * world_size)
    preflight(spec, cfg.model, list(cfg.data.patch_size), bn_batch or effective)
    return spec, effective, bn_batch


def budget_steps(trainer_cfg: DictConfig, global_batch: int) -> int:
    """Optimizer steps of a run. budget_unit=patches: trainer.samples patches whatever the batch size (the
    same data, fewer steps at larger batches or more accumulation); budget_unit=steps: trainer.steps steps at
    every batch size (each of trainer.accumulate_steps micro-batches)."""
    if trainer_cfg.budget_unit == "steps":
        return int(trainer_cfg.steps)
    return math.ceil(int(trainer_cfg.samples) / global_batch)


def validation_steps(total_steps: int, validations: int) -> frozenset[int]:
    """The steps after which a run validates: `validations` times, evenly spaced, the last at the end.

    Spaced in fractions of the run rather than in patches, so that runs at every batch size and budget unit
    validate at the same points of their training (the convergence flag compares those points)."""
    return frozenset(max(1, round(total_steps * k / validations)) for k in range(1, validations + 1))


# ------------------------------------------------------------------------------------------ the device


def select_device(name: str, job_num: int = 0) -> torch.device:
    """cpu or cuda; with several GPUs, job k of a parallel sweep uses GPU k mod (number of GPUs)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "trainer.device=cuda, but no CUDA device is available (use trainer.device=auto or cpu)"
        )
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", job_num % torch.cuda.device_count())


def amp_dtype(setting: object, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. bf16 needs no loss scaling; fp16 (older GPUs) does."""
    if device.type != "cuda" or setting is False:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def use_channels_last(setting: object, device: torch.device, effective_batch: int) -> bool:
    """trainer.channels_last: true, false, or auto = on only where scripts/benchmark.py measured it faster.

    On a CPU (oneDNN) it made a step faster at batch 2 for every norm measured (benchmark section c,
    channels_last table; InstanceNorm too, although its layers drop the layout: its convs still gain). At
    batch 1 it stays off: with trainer.cpu_conv=auto a channels_last model was slower per step (benchmark
    section e, its last column; docs/benchmarks.md). On CUDA it stays off
    until the benchmark's channels_last table has been measured on a GPU.
    """
    if setting != "auto":
        return bool(setting)
    return device.type == "cpu" and effective_batch >= 2


# Memory a CUDA process holds outside PyTorch's allocator (its context and loaded kernels), which a
# per-process memory fraction does not cap: the share of each of k runs on one GPU leaves this much per run.
CUDA_CONTEXT_BYTES = 2**30


def memory_share(runs_per_gpu: int, free: int, total: int, gpu: str) -> float:
    """The fraction of the GPU's memory each of `runs_per_gpu` runs may allocate, after checking that this
    run's share is free (`free` and `total` as torch.cuda.mem_get_info gives them, in bytes).

    The k shares and k contexts fill the device exactly, so the k-th run to start still finds its share free
    while the others hold theirs. Raises UserError naming the GPU, its free memory and k when it is not."""
    if runs_per_gpu == 1:
        return 1.0
    share = (total - runs_per_gpu * CUDA_CONTEXT_BYTES) / runs_per_gpu
    if share <= 0 or free < share:
        gib = 2**30
        need = f"{share / gib:.1f} GiB" if share > 0 else "more than the GPU has"
        raise UserError(
            f"trainer.runs_per_gpu={runs_per_gpu}: {gpu} has {free / gib:.1f} GiB free of {total / gib:.1f} GiB, "
            f"and each of {runs_per_gpu} runs needs its share, {need} (plus about "
            f"{CUDA_CONTEXT_BYTES / gib:.0f} GiB for its CUDA context): lower trainer.runs_per_gpu, or free the GPU"
        )
    return share / total


def set_up_device(cfg: DictConfig, device: torch.device) -> None:
    """Threads, and on CUDA the choice between speed (cudnn.benchmark) and bit-exact reproducibility, and this
    run's share of the GPU's memory (trainer.runs_per_gpu)."""
    if cfg.trainer.num_threads:
        torch.set_num_threads(int(cfg.trainer.num_threads))
    if device.type == "cuda":
        deterministic = bool(cfg.trainer.deterministic)
        if deterministic:  # cuBLAS needs a fixed workspace for deterministic results (CUDA docs)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = not deterministic
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        torch.cuda.init()  # the allocator's statistics exist only once CUDA is initialised (a fresh process)
        torch.cuda.reset_peak_memory_stats(device)  # this run's peak, not an earlier run's in this process
        runs, fraction = int(cfg.trainer.runs_per_gpu), 1.0
        if runs > 1:
            torch.cuda.empty_cache()  # what an earlier run of this process cached must not count against this one
            free, total = torch.cuda.mem_get_info(device)
            gpu = f"GPU {device.index} ({torch.cuda.get_device_name(device)})"
            fraction = memory_share(runs, free, total, gpu)
        torch.cuda.set_per_process_memory_fraction(fraction, device)  # 1.0: no cap left by an earlier run


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------- optimizer and schedule


def scaled_lr(optim_cfg: DictConfig, global_batch: int) -> float:
    """Learning rate after the batch-size scaling rule (none | linear | sqrt) relative to reference_batch."""
    ratio = global_batch / float(optim_cfg.reference_batch)
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[optim_cfg.lr_scaling]
    return float(optim_cfg.lr) * factor


def make_optimizer(optim_cfg: DictConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=lr,
            momentum=optim_cfg.momentum,
            nesterov=True,
            weight_decay=optim_cfg.weight_decay,
        )
    params = list(model.parameters())
    return torch.optim.AdamW(
        params,
        lr=lr,
        betas=tuple(optim_cfg.betas),
        weight_decay=optim_cfg.weight_decay,
        # One kernel per parameter instead of a dozen small ops: the same update, and at batch 1 on a CPU
        # the optimizer's fixed cost per step is a tenth of the step (benchmark section e).
        fused=fused_supported(params) or None,
    )


def fused_supported(params: list[torch.Tensor]) -> bool:
    """PyTorch's fused AdamW takes floating-point parameters on a CPU or a CUDA device."""
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base LR at `step`: linear warm-up, then cosine / poly decay (or constant)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "poly":
        return (1.0 - progress) ** 0.9
    return 1.0


# ------------------------------------------------------------------------------------------- building


@dataclass
class Built:
    """Everything a run trains with. `net` trains (under DDP it averages gradients over ranks); `model`, the
    plain module, is what is evaluated and saved."""

    cfg: DictConfig
    plan: Plan
    data: DataBundle
    class_names: list[str]  # foreground classes 1..K
    model: nn.Module
    net: nn.Module
    memory_format: torch.memory_format
    renorm_layers: list[Any]  # BatchRenorm layers, found once: walking every module costs per step
    lr: float
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    amp: torch.dtype | None  # autocast dtype, None for fp32
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    sampler: BatchSampler
    inference: Inference

    @property
    def num_classes(self) -> int:
        return len(self.class_names) + 1

    @property
    def device(self) -> torch.device:
        return self.plan.device

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)


def build(cfg: DictConfig, plan: Plan, data: DataBundle | None = None) -> Built:
    """Seed, load (or reuse) the data and build the model, optimizer, schedule, precision and batch source."""
    device = plan.device
    set_up_device(cfg, device)
    seed_everything(int(cfg.seed))
    data = data if data is not None else load_data(cfg.data)
    if cfg.data.cache_on_device:
        keep_on_device(data, device)
    labels = data.info.labels
    class_names = [labels[i] for i in sorted(labels) if i != 0]
    spacing = median_spacing(data.train)  # DynUNet is planned for it
    model = build_model(cfg.model, plan.spec, data.info.num_channels, len(labels), spacing).to(device)
    set_cpu_conv(model, str(cfg.trainer.cpu_conv))  # batch-1 conv3d on a CPU: norms/cpu_conv.py
    memory_format = torch.contiguous_format
    if use_channels_last(cfg.trainer.channels_last, device, plan.effective_batch):
        memory_format = torch.channels_last_3d
        model.to(memory_format=memory_format)
    net = distributed.wrap_ddp(model, device)
    if cfg.trainer.compile:  # the training forward only; evaluation and saving use the plain module
        # Static shapes: every layer sees one shape for the whole run, and inductor's dynamic-shape lowering of
        # convolution_backward failed on the smoke model at batch 1 on a CPU (ValueRangeError). There the conv
        # routes break the graph between layers, so a block's code meets one shape per layer: dynamo's default
        # of 8 compilations per code object fell back to eager, with five warning lines each, on nnU-Net's.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        net = torch.compile(net, dynamic=False)
    lr = scaled_lr(cfg.optim, plan.global_batch)  # the optimizer's batch: all ranks
    optimizer = make_optimizer(cfg.optim, model, lr)
    warmup = int(plan.total_steps * float(cfg.optim.warmup_fraction))
    schedule = str(cfg.optim.schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, plan.total_steps, warmup, schedule)
    )
    amp = amp_dtype(cfg.trainer.amp, device)
    sampler = BatchSampler(
        data.train,
        cfg.data,
        int(cfg.seed),
        distributed.rank(),
        plan.world_size,
        pin_memory=device.type == "cuda",
    )
    built = Built(
        cfg=cfg,
        plan=plan,
        data=data,
        class_names=class_names,
        model=model,
        net=net,
        memory_format=memory_format,
        renorm_layers=renorm_layers(model),
        lr=lr,
        optimizer=optimizer,
        scheduler=scheduler,
        amp=amp,
        scaler=torch.amp.GradScaler("cuda", enabled=amp == torch.float16),
        loss_fn=DiceCELoss(to_onehot_y=True, softmax=True),
        sampler=sampler,
        inference=None,  # type: ignore[arg-type]  # set below: it needs the built object's autocast
    )
    built.inference = Inference(
        roi_size=list(cfg.data.patch_size),
        sw_batch_size=int(cfg.trainer.sw_batch_size),
        overlap=float(cfg.trainer.sw_overlap),
        device=device,
        autocast=built.autocast,
        batch_stats_windows=cfg.trainer.batch_stats_windows,
    )
    return built
