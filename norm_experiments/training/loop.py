"""One training run, read top to bottom: data, model, optimizer, the loop, validation, outputs.

The budget is training patches seen (trainer.samples), not epochs, so runs at different batch sizes see the
same amount of data. Everything random is seeded; the batch of step t depends only on (seed, t), which is why
a checkpoint plus the step number is enough to continue a run exactly.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from norm_experiments.config import run_identity, validate_config
from norm_experiments.data.pipeline import BatchSampler, DataBundle, keep_on_device, load_data
from norm_experiments.errors import UserError
from norm_experiments.models import build_model
from norm_experiments.models.preflight import preflight
from norm_experiments.norms import (
    BNStatMonitor,
    NormSpec,
    bn_eval_mode,
    make_norm_spec,
    recompute_bn_statistics,
    renorm_diagnostics,
    renorm_layers,
)
from norm_experiments.training import checkpoint as ckpt
from norm_experiments.training import distributed
from norm_experiments.training.evaluate import Inference, ValResult, convergence, score_volumes, summarize
from norm_experiments.training.outputs import (
    library_versions,
    machine,
    peak_rss_mb,
    read_json,
    reset_peak_rss,
    write_json,
)
from norm_experiments.training.progress import Progress
from norm_experiments.training.tensorboard import log_hparams, open_writer, slice_panel

log = logging.getLogger("norm_experiments.train")

METRICS = "metrics.json"
RUN_CONFIG = (
    "run_config.yaml"  # the resolved config this run's checkpoint belongs to (Hydra rewrites .hydra/)
)

# Exit statuses of `norm-exp-train`, for scripts and launchers that requeue (see README).
EXIT_INTERRUPTED = 3  # SIGTERM/SIGINT: checkpoint saved, run the same command again to continue
EXIT_DIVERGED = 4  # loss became NaN/inf: status "diverged" in metrics.json


class RunInterrupted(Exception):
    """SIGTERM or SIGINT arrived; a checkpoint was saved."""


class RunDiverged(Exception):
    """The loss became NaN or infinite."""


@dataclass
class State:
    """What a checkpoint restores besides the model/optimizer: counters and the validation history."""

    step: int = 0
    samples_seen: int = 0
    best_val_dice: float = -1.0
    best_step: int = -1
    train_seconds: float = 0.0
    data_wait_seconds: float = 0.0
    amp_skipped_steps: int = 0
    history: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- set-up


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


def use_channels_last(setting: object, device: torch.device, norm: str, effective_batch: int) -> bool:
    """trainer.channels_last: true, false, or auto = on only where scripts/benchmark.py measured it faster.

    On a CPU (oneDNN) it made a step 1.1-1.5x faster at batch >= 2 for every norm but InstanceNorm, which
    drops the layout and was slower at batch 8; at batch 1 PyTorch's CPU conv3d takes another path, where it
    was slower. On CUDA it stays off until the benchmark's channels_last table has been measured on a GPU.
    """
    if setting != "auto":
        return bool(setting)
    return device.type == "cpu" and effective_batch >= 2 and norm != "instance"


def budget_steps(trainer_cfg: DictConfig, global_batch: int) -> int:
    """Optimizer steps of a run. budget_unit=patches: trainer.samples patches whatever the batch size (the
    same data, fewer steps at larger batches); budget_unit=steps: trainer.steps steps at every batch size."""
    if trainer_cfg.budget_unit == "steps":
        return int(trainer_cfg.steps)
    return math.ceil(int(trainer_cfg.samples) / global_batch)


def validation_steps(total_steps: int, validations: int) -> set[int]:
    """The steps after which a run validates: `validations` times, evenly spaced, the last at the end.

    Spaced in fractions of the run rather than in patches, so that runs at every batch size and budget unit
    validate at the same points of their training (the convergence flag compares those points)."""
    return {max(1, round(total_steps * k / validations)) for k in range(1, validations + 1)}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def scaled_lr(optim_cfg: DictConfig, effective_batch: int) -> float:
    """Learning rate after the batch-size scaling rule (none | linear | sqrt) relative to reference_batch."""
    ratio = effective_batch / float(optim_cfg.reference_batch)
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
    return torch.optim.AdamW(
        model.parameters(), lr=lr, betas=tuple(optim_cfg.betas), weight_decay=optim_cfg.weight_decay
    )


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


# ------------------------------------------------------------------------------------- existing runs


def _flatten(node: object, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        out: dict[str, object] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def config_diff(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two resolved configs, as 'key: old -> new'."""
    a, b = _flatten(old), _flatten(new)
    return [
        f"{k}: {a.get(k, '<absent>')} -> {b.get(k, '<absent>')}"
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k)
    ]


def existing_run(run_dir: Path, run_id: str, cfg: DictConfig) -> dict | None:
    """Decide what to do with what a previous run left in run_dir.

    Returns the previous metrics when that run completed with this very config (nothing to do). Raises
    UserError when the folder holds a run of a different config, because continuing or overwriting it would
    lose a result. Returns None when the run should start or continue from its checkpoint.
    """
    if cfg.trainer.overwrite:
        return None
    previous = read_json(run_dir / METRICS)
    if previous is None:
        return None
    if previous.get("run_id") == run_id:
        return previous if previous.get("status") == "completed" else None
    has_result = previous.get("status") == "completed" or (run_dir / ckpt.CHECKPOINT).exists()
    if not has_result:
        return None  # a run that failed before saving anything: nothing to lose
    if cfg.trainer.force_resume and previous.get("status") != "completed":
        return None
    old_config = run_dir / RUN_CONFIG
    diff = []
    if old_config.exists():
        old = OmegaConf.to_container(OmegaConf.load(old_config), resolve=True)
        diff = config_diff(old, OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    raise UserError(
        f"{run_dir} holds a {previous.get('status')} run of a different config "
        f"({'; '.join(diff[:6]) or 'see its run_config.yaml'}). Use another hydra.run.dir, "
        "trainer.overwrite=true to retrain in place (its result is lost), or trainer.force_resume=true "
        "to continue an unfinished run with the new config"
    )


# ------------------------------------------------------------------------------------------ the run


class Run:
    """Builds everything for one run, then trains it. Split into methods that read in order."""

    def __init__(self, cfg: DictConfig, run_dir: Path, job_num: int = 0) -> None:
        validate_config(cfg)
        self.world_size = distributed.world_size()  # processes (GPUs) of a torchrun launch; 1 otherwise
        if self.world_size > 1:  # 2 GPUs x batch 1 is not the run 1 GPU x batch 1: part of the run's identity
            with open_dict(cfg):
                cfg.trainer.world_size = self.world_size
        self.cfg, self.run_dir = cfg, run_dir
        self.run_id = run_identity(cfg)
        self.spec: NormSpec = make_norm_spec(str(cfg.norm.name), **OmegaConf.to_container(cfg.norm.options))
        # data.batch_size is volumes per GPU. effective_batch: patches per rank and step (what a plain
        # BatchNorm layer sees); global_batch: patches per optimizer step, all ranks (what the budget counts).
        self.effective_batch = int(cfg.data.batch_size) * int(cfg.data.patches_per_volume)
        self.global_batch = self.effective_batch * self.world_size
        self.bn_batch = self._bn_batch()
        preflight(
            self.spec,
            cfg.model,
            list(cfg.data.patch_size),
            self.global_batch if self.spec.name == "syncbatch" else self.effective_batch,
        )
        self.total_steps = budget_steps(cfg.trainer, self.global_batch)
        self.val_steps = validation_steps(self.total_steps, int(cfg.trainer.validations))
        self.ckpt_every = max(1, round(int(cfg.trainer.checkpoint_every_samples) / self.global_batch))
        gpu_index = distributed.local_rank() if self.world_size > 1 else job_num
        self.device = select_device(str(cfg.trainer.device), gpu_index)

    def _bn_batch(self) -> int | None:
        """Patches each training-mode BatchNorm statistic is computed over; None: no batch statistics."""
        if not self.spec.uses_batch_statistics:
            return None
        if self.spec.name == "syncbatch":
            return self.global_batch  # statistics synchronized over all ranks
        if self.spec.name == "ghostbatch":
            return min(int(self.spec.options["virtual_batch"]), self.effective_batch)
        return self.effective_batch

    # -- building

    def build(self) -> None:
        cfg = self.cfg
        if cfg.trainer.num_threads:
            torch.set_num_threads(int(cfg.trainer.num_threads))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = not cfg.trainer.deterministic
            torch.use_deterministic_algorithms(bool(cfg.trainer.deterministic), warn_only=True)
        seed_everything(int(cfg.seed))
        self.data: DataBundle = load_data(cfg.data)
        if cfg.data.cache_on_device:
            keep_on_device(self.data, self.device)
        self.num_classes = len(self.data.info.labels)
        self.class_names = [self.data.info.labels[i] for i in sorted(self.data.info.labels) if i != 0]
        self.model = build_model(cfg.model, self.spec, self.data.info.num_channels, self.num_classes).to(
            self.device
        )
        # self.net trains (under DDP it averages the gradients over ranks); self.model, the plain module, is
        # what is evaluated and saved.
        self.memory_format = torch.contiguous_format
        if use_channels_last(cfg.trainer.channels_last, self.device, self.spec.name, self.effective_batch):
            self.memory_format = torch.channels_last_3d
            self.model.to(memory_format=self.memory_format)
        self.renorm_layers = renorm_layers(self.model)  # found once: walking every module costs per step
        self.net = distributed.wrap_ddp(self.model, self.device)
        if cfg.trainer.compile:  # the training forward only; evaluation and saving use the plain module
            self.net = torch.compile(self.net)
        self.lr = scaled_lr(cfg.optim, self.global_batch)  # the optimizer's batch: all ranks
        self.optimizer = make_optimizer(cfg.optim, self.model, self.lr)
        warmup = int(self.total_steps * float(cfg.optim.warmup_fraction))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, warmup, str(cfg.optim.schedule))
        )
        self.amp = amp_dtype(cfg.trainer.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        self.sampler = BatchSampler(
            self.data.train,
            cfg.data,
            int(cfg.seed),
            distributed.rank(),
            self.world_size,
            pin_memory=self.device.type == "cuda",
        )
        self.inference = Inference(
            roi_size=list(cfg.data.patch_size),
            sw_batch_size=int(cfg.trainer.sw_batch_size),
            overlap=float(cfg.trainer.sw_overlap),
            device=self.device,
            autocast=self.autocast,
        )
        self.state = State()

    def autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    # -- checkpoints

    def save_checkpoint(self) -> None:
        if not distributed.is_main():  # every rank holds the same state; rank 0 writes it
            return
        ckpt.save(
            self.run_dir / ckpt.CHECKPOINT,
            {
                "run_id": self.run_id,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "state": self.state.__dict__,
                "rng": ckpt.rng_states(),
            },
        )

    def restore_checkpoint(self) -> bool:
        path = self.run_dir / ckpt.CHECKPOINT
        if not path.exists() or self.cfg.trainer.overwrite:
            return False
        saved = ckpt.load(path, trust=bool(self.cfg.trainer.trust_checkpoint))
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        self.state = State(**saved["state"])
        ckpt.restore_rng_states(saved["rng"])
        log.info("resuming %s from step %d/%d", self.run_dir, self.state.step, self.total_steps)
        return True

    # -- metrics.json

    def metrics(self, status: str, error: str | None = None, **extra: object) -> dict:
        s = self.state
        train_s = max(s.train_seconds, 1e-9)
        return {
            "status": status,
            "error": error,
            "run_id": self.run_id,
            "run_name": self.run_dir.name,
            "norm": self.spec.name,
            "norm_options": dict(self.spec.options),
            "model": str(self.cfg.model.name),
            "seed": int(self.cfg.seed),
            "batch_size": int(self.cfg.data.batch_size),  # volumes per GPU (per rank)
            "patches_per_volume": int(self.cfg.data.patches_per_volume),
            "effective_batch": self.effective_batch,  # patches per rank and step
            "world_size": self.world_size,
            "global_batch": self.global_batch,  # patches per optimizer step, all ranks
            "bn_batch": self.bn_batch,  # patches per BatchNorm statistic in training (None: not batch-based)
            "lr": self.lr,
            "lr_scaling": str(self.cfg.optim.lr_scaling),
            "intensity": str(self.cfg.data.intensity),  # a condition of the study: raw or z-scored input
            "budget_unit": str(self.cfg.trainer.budget_unit),  # patches (same data) or steps (same steps)
            "samples_budget": self.total_steps * self.global_batch,
            "samples_seen": s.samples_seen,
            "steps": s.step,
            "total_steps": self.total_steps,
            "best_val_dice": s.best_val_dice if s.best_step >= 0 else None,
            "best_step": s.best_step if s.best_step >= 0 else None,
            "samples_per_s": s.samples_seen / train_s if s.samples_seen else None,
            "data_wait_fraction": s.data_wait_seconds / train_s if s.samples_seen else None,
            "amp": str(self.amp).replace("torch.", "") if self.amp else "off",
            "amp_skipped_steps": s.amp_skipped_steps,
            "peak_memory_mb": peak_rss_mb(),
            "peak_cuda_memory_mb": torch.cuda.max_memory_allocated() / 2**20
            if self.device.type == "cuda"
            else None,
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "machine": machine(),
            "versions": library_versions(),
            "history": s.history,
            "preprocessing": self.data.preprocessing,  # intensity per channel, CT statistics, spacing
            **extra,
        }

    def write_metrics(self, status: str, error: str | None = None, **extra: object) -> dict:
        metrics = self.metrics(status, error, **extra)
        if distributed.is_main():
            write_json(self.run_dir / METRICS, metrics)
        return metrics

    # -- training

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimizer step; returns the loss as a tensor (no host sync here)."""
        if not self.model.training:  # evaluation restores the modes it changes; walking them costs per step
            self.net.train()
        for layer in self.renorm_layers:
            layer.set_progress(self.state.step / self.total_steps)
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.loss_fn(self.net(images), labels)
        self.scaler.scale(loss).backward()
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if scale_before is not None and self.scaler.get_scale() < scale_before:
            self.state.amp_skipped_steps += 1  # fp16 overflow: the scaler skipped this step
        self.scheduler.step()
        return loss.detach()

    def evaluate(self, model: nn.Module, mode: str = "running", surface: bool = False) -> ValResult:
        """Dice (and HD95 when `surface`) on the validation volumes with BatchNorm layers in `mode` (running |
        batch, see bn_eval_mode).

        With several ranks, each evaluates every world_size-th volume and the per-class sums are added: the
        same numbers as one process. No forward communicates: sync layers use their rank's batch statistics
        ("batch" mode normalizes each forward with its own statistics, as in one process), so ranks with
        different numbers of forwards never wait.
        """
        with bn_eval_mode(model, mode), distributed.local_batch_statistics(model):
            volumes = distributed.shard(self.data.val)
            totals, example = score_volumes(model, volumes, self.num_classes, self.inference, surface)
        if self.world_size > 1:
            totals = distributed.sum_across_ranks(totals)
        return summarize(totals, surface, example)

    def validate(self, writer, surface: bool = False) -> ValResult:
        distributed.broadcast_buffers(self.model)  # one model on every rank: rank 0's running statistics
        result = self.evaluate(self.model, surface=surface)
        step = self.state.step
        self.log_scores(writer, result)
        if result.example is not None:
            writer.add_image(
                "val/slice_input_truth_prediction", slice_panel(*result.example, self.num_classes), step
            )
        self.state.history.append(
            {"step": step, "samples_seen": self.state.samples_seen, "val_dice": result.dice_mean}
        )
        if result.dice_mean > self.state.best_val_dice:  # False for nan: no class present
            self.state.best_val_dice, self.state.best_step = result.dice_mean, step
            if distributed.is_main():
                ckpt.save(self.run_dir / ckpt.BEST_WEIGHTS, self.model.state_dict())
        return result

    def log_scores(self, writer, result: ValResult, suffix: str = "") -> None:
        """val/dice_mean{suffix}, per class, and HD95 when computed; absent classes are not logged."""
        step = self.state.step
        writer.add_scalar(f"val/dice_mean{suffix}", result.dice_mean, step)
        if result.hd95_mean is not None:
            writer.add_scalar(f"val/hd95_mean{suffix}", result.hd95_mean, step)
        if suffix:
            return
        for name, dice in zip(self.class_names, result.dice_per_class):
            if dice is not None:
                writer.add_scalar(f"val/dice_{name}", dice, step)
        for name, hd95 in zip(self.class_names, result.hd95_per_class or []):
            if hd95 is not None:
                writer.add_scalar(f"val/hd95_{name}", hd95, step)

    def log_diagnostics(self, writer, monitor: BNStatMonitor, loss: float) -> None:
        step = self.state.step
        writer.add_scalar("train/loss", loss, step)
        writer.add_scalar("train/lr", self.scheduler.get_last_lr()[0], step)
        if self.state.train_seconds > 0:
            writer.add_scalar("train/samples_per_s", self.state.samples_seen / self.state.train_seconds, step)
        for name, value in monitor.pop().items():
            writer.add_scalar(f"bn_stats/{name}", value, step)
        for name, value in renorm_diagnostics(self.model).items():
            writer.add_scalar(f"batchrenorm/{name}", value, step)

    def precise_bn_batches(self):
        """Training patches for PreciseBN, drawn from a seed stream the training batches never use.

        With several ranks, syncbatch layers synchronize as in training: each rank takes its slice of every
        global batch (the same number of forwards on every rank) and the layers merge their statistics. Other
        BatchNorm layers saw only their rank's batch in training: every rank runs all the batches itself, with
        no communication, and gets the same statistics.
        """
        sync = self.spec.name == "syncbatch"
        rank, world = (distributed.rank(), self.world_size) if sync else (0, 1)
        sampler = BatchSampler(self.data.train, self.cfg.data, int(self.cfg.seed) + 1_000_003, rank, world)
        needed = math.ceil(int(self.cfg.trainer.precise_bn_samples) / (self.effective_batch * world))
        return (sampler.batch(i)[0] for i in range(needed))

    def evaluate_bn_modes(self, running: ValResult) -> dict[str, ValResult]:
        """Scores under BatchNorm's three evaluation modes, without retraining.

        running: the running averages BatchNorm kept during training (what model.eval() uses).
        batch:   each forward normalizes with its own statistics (the windows of one sliding-window batch).
        precise: population statistics recomputed over training patches after training (PreciseBN), on a copy.
        """
        scores = {"running": running, "batch": self.evaluate(self.model, "batch", surface=True)}
        precise = copy.deepcopy(self.model)
        recompute_bn_statistics(precise, self.precise_bn_batches(), self.device)
        # Already equal on every rank, except torch's own SyncBatchNorm (MONAI nets), whose statistics
        # recompute_bn_statistics does not merge: then rank 0's share of the patches decides.
        distributed.broadcast_buffers(precise)
        scores["precise"] = self.evaluate(precise, surface=True)
        return scores

    def train(self) -> dict:
        """Train to the budget (continuing from a checkpoint if there is one) and write every output."""
        started = time.perf_counter()
        reset_peak_rss()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.build()
        resumed = self.restore_checkpoint()
        if distributed.is_main():
            OmegaConf.save(self.cfg, self.run_dir / RUN_CONFIG, resolve=True)
        self.write_metrics("running")
        writer = _NoWriter()
        if distributed.is_main():
            writer = open_writer(self.run_dir, self.state.step if resumed else None)
        monitor = BNStatMonitor(self.model)
        gpus = f" x{self.world_size} ranks" if self.world_size > 1 else ""
        label = f"[{self.spec.name} bs={self.cfg.data.batch_size}{gpus} seed={self.cfg.seed}]"
        shown = str(self.cfg.trainer.progress) if distributed.is_main() else "none"
        progress = Progress(self.total_steps, self.state.step, shown, label)
        stop = _StopRequest()
        try:
            with stop.installed(), self.batch_executor() as prefetch:
                self._loop(writer, monitor, progress, stop, prefetch)
            final = self._finish(writer, started)
        except RunInterrupted:
            self.save_checkpoint()
            self.write_metrics("interrupted", "stopped by a signal; run the same command again to continue")
            who = f"rank {distributed.rank()}: " if self.world_size > 1 else ""
            log.warning("%sinterrupted at step %d: checkpoint in %s", who, self.state.step, self.run_dir)
            distributed.barrier()  # no rank exits before rank 0 saved: torchrun stops the rest when one exits
            raise
        finally:
            progress.close()
            monitor.close()
            writer.close()
        return final

    def batch_executor(self) -> ThreadPoolExecutor | InlineExecutor:
        """Where the next batch is cut. On CUDA, in a background thread, while the GPU runs this step. On
        a CPU, inline: cutting costs about 1 % of a CPU step, and a thread bought nothing measurable there
        (scripts/benchmark.py section b: within noise of inline), while it is one more thread on the cores
        that torch's threads use."""
        return prefetch_pool() if self.device.type == "cuda" else InlineExecutor()

    def _loop(
        self,
        writer,
        monitor,
        progress: Progress,
        stop: _StopRequest,
        prefetch: ThreadPoolExecutor | InlineExecutor,
    ) -> None:
        s = self.state
        t0 = time.perf_counter()
        next_batch = prefetch.submit(self.sampler.batch, s.step)
        while s.step < self.total_steps:
            images, labels = next_batch.result()
            if s.step + 1 < self.total_steps:  # in a thread: cut the next batch while this one trains
                next_batch = prefetch.submit(self.sampler.batch, s.step + 1)
            waited = time.perf_counter() - t0  # blocked on data (inline: the whole cut counts as waiting)
            images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
            labels = labels.to(self.device, non_blocking=True)
            # BN diagnostics cost extra reductions: measure only the steps that are logged.
            next_step = s.step + 1
            monitor.enabled = (
                next_step % int(self.cfg.trainer.log_every_steps) == 0 or next_step == self.total_steps
            )
            loss = self.train_step(images, labels)
            s.step += 1
            s.samples_seen += images.shape[0] * self.world_size
            log_now = s.step % int(self.cfg.trainer.log_every_steps) == 0 or s.step == self.total_steps
            checkpoint_now = s.step % self.ckpt_every == 0 and s.step < self.total_steps
            loss_value = None
            # Reading the loss syncs with the GPU: only at logging steps (the progress display shows the last
            # one read), and before a checkpoint, so that a checkpoint never holds a diverged state.
            if log_now or checkpoint_now:
                loss_value = float(loss)
                self._check_finite(loss_value)
            s.train_seconds += time.perf_counter() - t0
            s.data_wait_seconds += waited
            if log_now:
                self.log_diagnostics(writer, monitor, loss_value)
            if s.step in self.val_steps and s.step < self.total_steps:
                progress.dice = self.validate(writer).dice_mean
            if checkpoint_now:
                self.save_checkpoint()
            progress.update(s.step, loss_value)
            if distributed.any_rank(stop.requested):  # all ranks stop after the same step
                raise RunInterrupted
            t0 = time.perf_counter()

    def _check_finite(self, loss: float) -> None:
        if math.isfinite(loss):
            return
        if self.amp == torch.float16 and self.state.amp_skipped_steps < 50:
            return  # fp16 overflow: the scaler skips the step and lowers its scale
        last = self.run_dir / ckpt.CHECKPOINT
        where = f"last good checkpoint: {last}" if last.exists() else "no checkpoint was saved yet"
        raise RunDiverged(f"loss became {loss} at step {self.state.step}; {where}")

    def _finish(self, writer, started: float) -> dict:
        final = self.validate(writer, surface=True)
        if final.absent:
            names = ", ".join(self.class_names[c - 1] for c in final.absent)
            log.warning("class(es) %s absent from every validation case: left out of the means", names)
        extra: dict[str, object] = {
            "val_dice": final.dice_mean,
            "val_dice_per_class": dict(zip(self.class_names, final.dice_per_class)),
            "val_hd95": final.hd95_mean,
            "val_hd95_per_class": dict(zip(self.class_names, final.hd95_per_class or [])),
            "absent_classes": [self.class_names[c - 1] for c in final.absent],
            "convergence": convergence(self.state.history, self.total_steps),
        }
        if self.spec.uses_batch_statistics and self.cfg.trainer.eval_modes:
            modes = self.evaluate_bn_modes(final)
            extra["eval_modes"] = {mode: result.dice_mean for mode, result in modes.items()}
            extra["eval_modes_hd95"] = {mode: result.hd95_mean for mode, result in modes.items()}
            for mode, result in modes.items():
                self.log_scores(writer, result, suffix=f"_{mode}")
        self.save_checkpoint()
        if distributed.is_main():
            ckpt.save(self.run_dir / ckpt.FINAL_WEIGHTS, self.model.state_dict())
        extra["wall_time_s"] = time.perf_counter() - started
        metrics = self.write_metrics("completed", **extra)
        hparams = {
            k: metrics[k]
            for k in (
                "norm",
                "batch_size",
                "patches_per_volume",
                "effective_batch",
                "world_size",
                "global_batch",
                "seed",
                "lr",
                "model",
                "intensity",
                "budget_unit",
            )
        }
        scores = {"hparam/val_dice": final.dice_mean, "hparam/best_val_dice": self.state.best_val_dice}
        scores["hparam/val_hd95"] = final.hd95_mean
        scores.update({f"hparam/val_dice_{m}": d for m, d in extra.get("eval_modes", {}).items()})  # type: ignore[union-attr]
        log_hparams(writer, hparams, scores)
        return metrics


class InlineExecutor:
    """The executor interface without a thread: submit() cuts the batch at once, in the training thread."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def __enter__(self) -> InlineExecutor:
        return self

    def __exit__(self, *exc) -> None:
        return None


def prefetch_pool() -> ThreadPoolExecutor:
    """The one background thread that cuts the next batch while the current one trains.

    It runs torch ops with a single intra-op thread: cutting a batch is a few small copies, and a second
    OpenMP team of torch's default size would compete with the training step's own threads for the cores
    (epochs about 8 % slower on 2 cores, measured with scripts/benchmark.py's epoch loop).
    """
    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(max_workers=1, initializer=_one_intra_op_thread)
    pool.submit(lambda: None).result()  # start the thread now, so its setting is in place before ours
    torch.set_num_threads(threads)  # set_num_threads also sets the default of threads started later
    return pool


def _one_intra_op_thread() -> None:
    # torch sets a thread's count up lazily, from the global default, at the thread's first query or
    # parallel op; query first, so that this setting is not replaced by that lazy set-up later.
    torch.get_num_threads()
    torch.set_num_threads(1)


class _StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint after the current step and stops.
    A second Ctrl-C falls back to Python's default (KeyboardInterrupt) for users who want out at once.
    Under torchrun a second signal is expected (torchrun forwards the one it got to every rank) and ignored;
    torchrun kills ranks that have not exited 30 s after forwarding."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum, frame) -> None:
        self.requested = True
        if not distributed.is_distributed():
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    @contextlib.contextmanager
    def installed(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def train(cfg: DictConfig, run_dir: Path, job_num: int = 0) -> dict:
    """Run (or skip, or continue) the experiment described by cfg in run_dir; returns its metrics.

    Raises UserError for configuration and data mistakes, RunInterrupted on SIGTERM/SIGINT and RunDiverged
    when the loss is no longer finite (metrics.json says so in each case).
    """
    run = Run(cfg, run_dir, job_num)
    previous = existing_run(run_dir, run.run_id, cfg)
    distributed.barrier()  # every rank has read the folder before rank 0 writes to it
    if previous is not None:
        log.info(
            "%s: already completed (val_dice=%.4f); nothing to do", run_dir, previous.get("val_dice") or 0.0
        )
        return {**previous, "skipped": True}
    try:
        return run.train()
    except RunDiverged as err:
        run.write_metrics("diverged", str(err))
        raise
    except (RunInterrupted, KeyboardInterrupt):
        raise
    except UserError as err:
        _record_failure(run, str(err))
        raise
    except Exception as err:
        _record_failure(run, f"{err.__class__.__name__}: {err}")
        raise


def _record_failure(run: Run, message: str) -> None:
    """Mark the run failed; never replaces a completed result (that run would have been skipped)."""
    if not distributed.is_main():
        return
    try:
        if hasattr(run, "state"):
            run.write_metrics("failed", message)
        else:
            record_failure(run.cfg, run.run_dir, message)
    except OSError:
        pass  # the folder itself may be the problem (read-only, full); the error is still reported


def record_failure(cfg: DictConfig, run_dir: Path, message: str) -> None:
    """Leave an honest record of a run that failed before it started (e.g. an impossible config in a
    sweep), so the sweep and its report show the cell as failed. Never touches an existing metrics.json."""
    if not distributed.is_main() or (run_dir / METRICS).exists():
        return
    record = {
        "status": "failed",
        "error": message,
        "run_name": run_dir.name,
        "norm": str(cfg.norm.name),
        "model": str(cfg.model.name),
        "seed": int(cfg.seed),
        "batch_size": int(cfg.data.batch_size),
        "patches_per_volume": int(cfg.data.patches_per_volume),
    }
    try:
        record["run_id"] = run_identity(cfg)
        write_json(run_dir / METRICS, record)
    except (OSError, ValueError):
        pass  # an unwritable folder or an unresolvable config: the error is still reported


class _NoWriter:
    """Stands in for the TensorBoard writer on ranks other than 0: every call does nothing."""

    def __getattr__(self, name: str) -> _NoWriter:
        return self

    def __call__(self, *args, **kwargs) -> None:
        return None
