"""One training run, read top to bottom: data, model, optimizer, the loop, validation, outputs.

The budget is training patches seen (trainer.samples), not epochs, so runs at different batch sizes see the
same amount of data. Everything random is seeded; the batch of step t depends only on (seed, t), which is why
a checkpoint plus the step number is enough to continue a run exactly.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from omegaconf import DictConfig, OmegaConf
from torch import nn

from norm_experiments.config import run_identity, validate_config
from norm_experiments.data.pipeline import BatchSampler, DataBundle, load_data
from norm_experiments.errors import UserError
from norm_experiments.models import build_model
from norm_experiments.models.preflight import preflight
from norm_experiments.norms import BNStatMonitor, NormSpec, make_norm_spec, renorm_diagnostics, set_renorm_progress
from norm_experiments.training import checkpoint as ckpt
from norm_experiments.training.evaluate import Inference, ValResult, evaluate_bn_modes, evaluate_running
from norm_experiments.training.outputs import library_versions, peak_rss_mb, read_json, reset_peak_rss, write_json
from norm_experiments.training.progress import Progress
from norm_experiments.training.tensorboard import log_hparams, open_writer, slice_panel

log = logging.getLogger("norm_experiments.train")

METRICS = "metrics.json"
RUN_CONFIG = "run_config.yaml"  # the resolved config this run's checkpoint belongs to (Hydra rewrites .hydra/)

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


def select_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device=cuda, but no CUDA device is available (use trainer.device=auto or cpu)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def amp_dtype(setting: object, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. bf16 needs no loss scaling; fp16 (older GPUs) does."""
    if device.type != "cuda" or setting is False:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


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
            model.parameters(), lr=lr, momentum=optim_cfg.momentum, nesterov=True, weight_decay=optim_cfg.weight_decay
        )
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(optim_cfg.betas), weight_decay=optim_cfg.weight_decay)


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
    return [f"{k}: {a.get(k, '<absent>')} -> {b.get(k, '<absent>')}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


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

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        validate_config(cfg)
        self.cfg, self.run_dir = cfg, run_dir
        self.run_id = run_identity(cfg)
        self.spec: NormSpec = make_norm_spec(str(cfg.norm.name), **OmegaConf.to_container(cfg.norm.options or {}))
        self.effective_batch = int(cfg.data.batch_size) * int(cfg.data.patches_per_volume)
        preflight(self.spec, cfg.model, list(cfg.data.patch_size), self.effective_batch)
        self.total_steps = math.ceil(int(cfg.trainer.samples) / self.effective_batch)
        self.val_every = max(1, round(int(cfg.trainer.val_every_samples) / self.effective_batch))
        self.ckpt_every = max(1, round(int(cfg.trainer.checkpoint_every_samples) / self.effective_batch))
        self.device = select_device(str(cfg.trainer.device))

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
        self.num_classes = len(self.data.info.labels)
        self.class_names = [self.data.info.labels[i] for i in sorted(self.data.info.labels) if i != 0]
        self.model = build_model(cfg.model, self.spec, self.data.info.num_channels, self.num_classes).to(self.device)
        self.lr = scaled_lr(cfg.optim, self.effective_batch)
        self.optimizer = make_optimizer(cfg.optim, self.model, self.lr)
        warmup = int(self.total_steps * float(cfg.optim.warmup_fraction))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, warmup, str(cfg.optim.schedule))
        )
        self.amp = amp_dtype(cfg.trainer.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        self.sampler = BatchSampler(self.data.train, cfg.data, int(cfg.seed))
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
        saved = ckpt.load(path)
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
            "batch_size": int(self.cfg.data.batch_size),
            "patches_per_volume": int(self.cfg.data.patches_per_volume),
            "effective_batch": self.effective_batch,
            "lr": self.lr,
            "lr_scaling": str(self.cfg.optim.lr_scaling),
            "samples_budget": int(self.cfg.trainer.samples),
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
            "peak_cuda_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if self.device.type == "cuda" else None,
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "versions": library_versions(),
            "history": s.history,
            **extra,
        }

    def write_metrics(self, status: str, error: str | None = None, **extra: object) -> dict:
        metrics = self.metrics(status, error, **extra)
        write_json(self.run_dir / METRICS, metrics)
        return metrics

    # -- training

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimizer step; returns the loss as a tensor (no host sync here)."""
        self.model.train()
        set_renorm_progress(self.model, self.state.step / self.total_steps)
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.loss_fn(self.model(images), labels)
        self.scaler.scale(loss).backward()
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if scale_before is not None and self.scaler.get_scale() < scale_before:
            self.state.amp_skipped_steps += 1  # fp16 overflow: the scaler skipped this step
        self.scheduler.step()
        return loss.detach()

    def validate(self, writer) -> ValResult:
        result = evaluate_running(self.model, self.data.val, self.num_classes, self.inference)
        step = self.state.step
        writer.add_scalar("val/dice_mean", result.dice_mean, step)
        for name, dice in zip(self.class_names, result.dice_per_class):
            writer.add_scalar(f"val/dice_{name}", dice, step)
        if result.example is not None:
            writer.add_image("val/slice_input_truth_prediction", slice_panel(*result.example, self.num_classes), step)
        self.state.history.append({"step": step, "samples_seen": self.state.samples_seen, "val_dice": result.dice_mean})
        if result.dice_mean > self.state.best_val_dice:
            self.state.best_val_dice, self.state.best_step = result.dice_mean, step
            ckpt.save(self.run_dir / ckpt.BEST_WEIGHTS, self.model.state_dict())
        return result

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
        """Training patches for PreciseBN, drawn from a seed stream the training batches never use."""
        sampler = BatchSampler(self.data.train, self.cfg.data, seed=int(self.cfg.seed) + 1_000_003)
        needed = math.ceil(int(self.cfg.trainer.precise_bn_samples) / self.effective_batch)
        return (sampler.batch(i)[0] for i in range(needed))

    def train(self) -> dict:
        """Train to the budget (continuing from a checkpoint if there is one) and write every output."""
        started = time.perf_counter()
        reset_peak_rss()
        self.build()
        resumed = self.restore_checkpoint()
        OmegaConf.save(self.cfg, self.run_dir / RUN_CONFIG, resolve=True)
        self.write_metrics("running")
        writer = open_writer(self.run_dir, self.state.step if resumed else None)
        monitor = BNStatMonitor(self.model)
        progress = Progress(self.total_steps, self.state.step, str(self.cfg.trainer.progress), self.run_dir.name)
        stop = _StopRequest()
        try:
            with stop.installed(), ThreadPoolExecutor(max_workers=1) as prefetch:
                self._loop(writer, monitor, progress, stop, prefetch)
            final = self._finish(writer, started)
        except RunInterrupted:
            self.save_checkpoint()
            self.write_metrics("interrupted", "stopped by a signal; run the same command again to continue")
            log.warning("interrupted at step %d: checkpoint saved in %s", self.state.step, self.run_dir)
            raise
        finally:
            progress.close()
            monitor.close()
            writer.close()
        return final

    def _loop(self, writer, monitor, progress: Progress, stop: _StopRequest, prefetch: ThreadPoolExecutor) -> None:
        s = self.state
        next_batch = prefetch.submit(self.sampler.batch, s.step)
        while s.step < self.total_steps:
            t0 = time.perf_counter()
            images, labels = next_batch.result()
            waited = time.perf_counter() - t0
            if s.step + 1 < self.total_steps:  # load the next batch while this one trains
                next_batch = prefetch.submit(self.sampler.batch, s.step + 1)
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            loss = self.train_step(images, labels)
            s.step += 1
            s.samples_seen += images.shape[0]
            log_now = s.step % int(self.cfg.trainer.log_every_steps) == 0 or s.step == self.total_steps
            loss_value = None
            if log_now or progress.wants_loss(s.step):  # reading the loss syncs with the GPU: only when shown
                loss_value = float(loss)
                self._check_finite(loss_value)
            s.train_seconds += time.perf_counter() - t0
            s.data_wait_seconds += waited
            if log_now:
                self.log_diagnostics(writer, monitor, loss_value)
            if s.step % self.val_every == 0 and s.step < self.total_steps:
                progress.dice = self.validate(writer).dice_mean
            if s.step % self.ckpt_every == 0 and s.step < self.total_steps:
                self.save_checkpoint()
            progress.update(s.step, loss_value)
            if stop.requested:
                raise RunInterrupted

    def _check_finite(self, loss: float) -> None:
        if math.isfinite(loss):
            return
        if self.amp == torch.float16 and self.state.amp_skipped_steps < 50:
            return  # fp16 overflow: the scaler skips the step and lowers its scale
        last = self.run_dir / ckpt.CHECKPOINT
        where = f"last good checkpoint: {last}" if last.exists() else "no checkpoint was saved yet"
        raise RunDiverged(f"loss became {loss} at step {self.state.step}; {where}")

    def _finish(self, writer, started: float) -> dict:
        final = self.validate(writer)
        extra: dict[str, object] = {
            "val_dice": final.dice_mean,
            "val_dice_per_class": dict(zip(self.class_names, final.dice_per_class)),
        }
        if self.spec.uses_batch_statistics and self.cfg.trainer.eval_modes:
            modes = evaluate_bn_modes(self.model, self.data.val, self.num_classes, self.inference, self.precise_bn_batches())
            extra["eval_modes"] = modes
            for mode, dice in modes.items():
                writer.add_scalar(f"val/dice_mean_{mode}", dice, self.state.step)
        self.save_checkpoint()
        ckpt.save(self.run_dir / ckpt.FINAL_WEIGHTS, self.model.state_dict())
        extra["wall_time_s"] = time.perf_counter() - started
        metrics = self.write_metrics("completed", **extra)
        hparams = {k: metrics[k] for k in ("norm", "batch_size", "patches_per_volume", "effective_batch", "seed", "lr", "model")}
        scores = {"hparam/val_dice": final.dice_mean, "hparam/best_val_dice": self.state.best_val_dice}
        scores.update({f"hparam/val_dice_{m}": d for m, d in extra.get("eval_modes", {}).items()})  # type: ignore[union-attr]
        log_hparams(writer, hparams, scores)
        return metrics


class _StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint after the current step and stops.
    A second Ctrl-C falls back to Python's default (KeyboardInterrupt) for users who want out at once."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum, frame) -> None:
        self.requested = True
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


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Run (or skip, or continue) the experiment described by cfg in run_dir; returns its metrics.

    Raises UserError for configuration and data mistakes, RunInterrupted on SIGTERM/SIGINT and RunDiverged
    when the loss is no longer finite (metrics.json says so in each case).
    """
    run = Run(cfg, run_dir)
    previous = existing_run(run_dir, run.run_id, cfg)
    if previous is not None:
        log.info("%s: already completed (val_dice=%.4f); nothing to do", run_dir, previous.get("val_dice") or 0.0)
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
    try:
        if hasattr(run, "state"):
            run.write_metrics("failed", message)
        else:
            write_json(run.run_dir / METRICS, {"status": "failed", "error": message, "run_id": run.run_id,
                                                "run_name": run.run_dir.name, "norm": run.spec.name,
                                                "seed": int(run.cfg.seed), "batch_size": int(run.cfg.data.batch_size)})
    except OSError:
        pass  # the folder itself may be the problem (read-only, full); the error is still reported
