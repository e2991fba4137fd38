"""One training run, read top to bottom: plan, decide what the run folder needs, build, train, validate, write.

The budget is training patches or optimizer steps (trainer.budget_unit), not epochs. A step is one optimizer
step: trainer.accumulate_steps micro-batches, each forwarded alone. Everything random is seeded; micro-batch
m of a run depends only on (seed, m), and step t is micro-batches t*k .. t*k + k - 1, which is why a
checkpoint (always between steps) plus the step number is enough to continue a run exactly. What is built
(data, model, optimizer...) comes from training/build.py, validation from training/evaluate.py, the
convergence flag from training/convergence.py, the run folder's policy from training/run_folder.py, the record
(metrics.json) from training/record.py.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from norm_experiments.data.pipeline import is_generated
from norm_experiments.errors import UserError
from norm_experiments.norms import BNStatMonitor, renorm_diagnostics
from norm_experiments.norms.registry import EVAL_MODES
from norm_experiments.run_record import Status, score_text
from norm_experiments.training import checkpoint as ckpt
from norm_experiments.training import distributed
from norm_experiments.training import record as records
from norm_experiments.training.build import Built, Plan, build, make_plan
from norm_experiments.training.convergence import convergence
from norm_experiments.training.evaluate import ValResult, evaluate_bn_modes, evaluate_built
from norm_experiments.training.outputs import reset_peak_rss
from norm_experiments.training.predictions import write_predictions
from norm_experiments.training.prefetch import batch_executor
from norm_experiments.training.progress import Progress
from norm_experiments.training.run_folder import (
    existing_run,
    locked,
    save_config,
    save_hydra_files,
)
from norm_experiments.training.signals import (
    RunInterrupted,
    StopRequest,
    current_phase,
    phase,
    stop_point_all_ranks,
)
from norm_experiments.training.tensorboard import (
    NoWriter,
    log_final_scores,
    log_hparams,
    log_mode_panel,
    log_scores,
    log_training,
    open_writer,
    remove_events,
)

log = logging.getLogger("norm_experiments.train")


class RunDiverged(Exception):
    """The loss became NaN or infinite."""


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def train(cfg: DictConfig, run_dir: Path, job_num: int = 0) -> dict:
    """Run (or skip, or continue) the experiment described by cfg in run_dir; returns its record.

    Raises UserError for configuration and data mistakes, RunInterrupted on SIGTERM/SIGINT and RunDiverged
    when the loss is no longer finite (metrics.json says so in each case).
    """
    with locked(run_dir):  # one process per run folder, from before it is read until the run ends
        plan = make_plan(cfg, job_num)
        previous = existing_run(run_dir, plan.run_id, cfg)
        distributed.barrier()  # every rank has read the folder before rank 0 writes to it
        if previous is not None:
            log.info(
                "%s: already completed (val_dice=%s); nothing to do (trainer.overwrite=true trains it again, "
                "e.g. after its data changed)",
                run_dir,
                score_text(previous.get("val_dice")),
            )
            return {**previous, "skipped": True}
        save_hydra_files(cfg, run_dir)
        run = Run(cfg, plan, run_dir)
        try:
            return run.train()
        except RunDiverged as err:
            run.write_record(Status.DIVERGED, str(err))
            raise
        except RunInterrupted:
            raise
        except UserError as err:
            run.fail(str(err))
            raise
        except Exception as err:
            run.fail(f"{err.__class__.__name__}: {err}")
            raise


@dataclass
class State:
    """What a checkpoint restores besides the model/optimizer: counters, the validation history and the
    logged training losses."""

    step: int = 0
    samples_seen: int = 0
    best_val_dice: float = -1.0
    best_step: int = -1
    train_seconds: float = 0.0
    data_wait_seconds: float = 0.0
    amp_skipped_steps: int = 0
    history: list[dict] = field(default_factory=list)
    # Mean training loss of each logging window ({"step", "loss"}; None where not finite): the convergence
    # flag's points. The open window's sum and steps are saved with a checkpoint, so a resumed run logs the
    # same means as an uninterrupted one.
    loss_history: list[dict] = field(default_factory=list)
    loss_window_sum: float = 0.0
    loss_window_steps: int = 0
    # The training cases' files it trained on, by name and size (preprocessing.dataset_files): a resume on other
    # data (a relative data.root read from another folder, files changed in place) is refused. None: older
    # checkpoints.
    dataset_files: str | None = None


class MicroBatches:
    """The run's training micro-batches in order (micro-batch m = sampler.batch(m)), moved to the device;
    `prefetch` cuts the next one while the current one trains. `waited`: seconds spent blocked on data
    (with the inline executor the whole cut counts as waiting)."""

    def __init__(self, built: Built, prefetch, start: int, end: int) -> None:
        self.b, self.prefetch, self.end = built, prefetch, end
        self.index = start
        self.pending = prefetch.submit(built.sampler.batch, start) if start < end else None
        self.waited = 0.0

    def take(self, count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        b = self.b
        for _ in range(count):
            t0 = time.perf_counter()
            assert self.pending is not None, "no micro-batch left in the run's budget"
            images, labels = self.pending.result()
            self.index += 1
            # in a thread (on CUDA): cut the next micro-batch while this one trains
            self.pending = (
                self.prefetch.submit(b.sampler.batch, self.index) if self.index < self.end else None
            )
            self.waited += time.perf_counter() - t0
            images = images.to(b.device, non_blocking=True, memory_format=b.memory_format)
            yield images, labels.to(b.device, non_blocking=True)


class Run:
    """One run in its folder: builds what it trains with, trains it, and writes every output."""

    def __init__(self, cfg: DictConfig, plan: Plan, run_dir: Path) -> None:
        self.cfg, self.plan, self.run_dir = cfg, plan, run_dir
        self.state = State()
        self.built: Built | None = None  # set by train(); a run that fails before has none
        self.loss_window: torch.Tensor | None = None  # the open logging window's loss sum, on the device

    @property
    def b(self) -> Built:
        assert self.built is not None, "Run.train() builds the run first"
        return self.built

    def train(self) -> dict:
        """Train to the budget (continuing from a checkpoint if there is one) and write every output."""
        started = time.perf_counter()
        reset_peak_rss()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Ctrl-C while the data loads raises KeyboardInterrupt (nothing written yet; train.py says so).
        self.built = build(self.cfg, self.plan)
        if self.cfg.trainer.amp is True and self.built.amp is None:  # asked for, and not given: say so
            log.info(
                "trainer.amp=true: autocast is for CUDA here; on %s this run trains in float32", self.b.device
            )
        resumed = self.restore_checkpoint()
        self.state.dataset_files = self.b.data.preprocessing.get("dataset_files")
        stop = StopRequest()
        # From here on SIGTERM/SIGINT only ask the loop to stop after a step; the handlers stay installed
        # until the checkpoint and the record of a stop are written.
        with stop.installed():
            save_config(self.cfg, self.run_dir)
            record = self.write_record(Status.RUNNING)
            writer = NoWriter()
            if distributed.is_main():
                if not resumed:
                    remove_events(self.run_dir)  # a killed attempt's curves would overlap this one's
                writer = open_writer(
                    self.run_dir, self.state.step if resumed else None, self.plan.global_batch
                )
                log_hparams(writer, record, completed=False)  # its HParams row before it completes
            monitor = BNStatMonitor(self.b.model)
            progress = Progress(self.plan.total_steps, self.state.step, self.progress_mode(), self.label())
            try:
                with batch_executor(self.plan.device) as prefetch:
                    self.loop(writer, monitor, progress, stop, prefetch)
                final = self.finish(writer, started)
            except RunInterrupted as stop_in:
                self.stopped(str(stop_in) or "training")
                raise
            finally:
                progress.close()
                monitor.close()
                writer.close()
        return final

    def progress_mode(self) -> str:
        if not distributed.is_main():
            return "none"
        mode = str(self.cfg.trainer.progress)
        # A live bar per run would garble a sweep's console (runs in parallel): lines, which the sweep's
        # console filters (sweep/progress.py).
        return "log" if mode == "auto" and _in_multirun() else mode

    def label(self) -> str:
        gpus = f" x{self.plan.world_size} ranks" if self.plan.world_size > 1 else ""
        k = self.plan.accumulate_steps
        acc = f" x{k} accumulated" if k > 1 else ""
        return f"[{self.plan.spec.name} bs={self.cfg.data.batch_size}{acc}{gpus} seed={self.cfg.seed}]"

    def loop(self, writer, monitor: BNStatMonitor, progress: Progress, stop: StopRequest, prefetch) -> None:
        """The training steps, from the current state to the budget."""
        s, total, b, k = self.state, self.plan.total_steps, self.b, self.plan.accumulate_steps
        every = int(self.cfg.trainer.log_every_steps)
        stream = MicroBatches(b, prefetch, s.step * k, total * k)
        self.loss_window = torch.tensor(s.loss_window_sum, device=b.device)  # on the device: no sync per step
        if s.step in self.plan.val_steps and s.step < total and not self.validated():
            # A stop interrupted this step's validation (the checkpoint was saved before it): done now.
            progress.dice = self.validate(writer).dice_mean
        t0 = time.perf_counter()
        while s.step < total:
            stream.waited = 0.0
            # BN diagnostics cost extra reductions: measure only the steps that are logged.
            monitor.enabled = (s.step + 1) % every == 0 or s.step + 1 == total
            loss = self.optimizer_step(stream.take(k), k)
            s.step += 1
            s.samples_seen += self.plan.global_batch
            self.loss_window = self.loss_window + loss.float()
            s.loss_window_steps += 1
            log_now = s.step % every == 0 or s.step == total
            checkpoint_now = s.step % self.plan.ckpt_every == 0 and s.step < total
            loss_value = None
            # Reading the loss syncs with the GPU: only at logging steps (the progress display shows the last
            # one read), and before a checkpoint, so that a checkpoint never holds a diverged state.
            if log_now or checkpoint_now:
                loss_value = float(loss)
                self.check_finite(loss_value)
            s.train_seconds += time.perf_counter() - t0
            s.data_wait_seconds += stream.waited
            if log_now:
                self.log_diagnostics(writer, monitor, loss_value)
            if s.step in self.plan.val_steps and s.step < total:
                progress.dice = self.validate(writer).dice_mean
            if checkpoint_now:
                self.save_checkpoint()
                self.write_record(Status.RUNNING)  # a killed run's record shows how far it got
            progress.update(s.step, loss_value)
            if distributed.any_rank(stop.requested):  # all ranks stop after the same step
                raise RunInterrupted(current_phase())
            t0 = time.perf_counter()

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimizer step on one batch; returns the loss as a tensor (no host sync here)."""
        return self.optimizer_step([(images, labels)], 1)

    def optimizer_step(
        self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], count: int
    ) -> torch.Tensor:
        """One optimizer step over `count` micro-batches (trainer.accumulate_steps); returns their mean loss
        as a tensor (no host sync here).

        Each micro-batch is forwarded and backpropagated alone, so BatchNorm normalizes it alone (and updates
        its running statistics once per micro-batch); its loss is scaled by 1/count, so the summed gradients
        are those of the mean loss over the micro-batches. Then one optimizer, loss-scaler and schedule step.
        The fp16 loss scaler scales every backward and unscales, checks and steps once (PyTorch's recipe for
        accumulation). Under DDP only the last backward averages gradients over ranks (no_sync before it).
        """
        b = self.b
        if not b.model.training:  # evaluation restores the modes it changes; walking them costs per step
            b.net.train()
        for layer in b.renorm_layers:
            layer.set_progress(self.state.step / self.plan.total_steps)
        b.optimizer.zero_grad(set_to_none=True)
        total, used = None, 0
        for images, labels in batches:
            used += 1
            with self.gradient_sync(last=used == count):
                with b.autocast():
                    loss = b.loss_fn(b.net(images), labels)
                b.scaler.scale(loss / count).backward()
            total = loss.detach() if total is None else total + loss.detach()
        assert used == count and total is not None, f"{used} micro-batches for a step of {count}"
        scale_before = b.scaler.get_scale() if b.scaler.is_enabled() else None
        b.scaler.step(b.optimizer)
        b.scaler.update()
        if scale_before is not None and b.scaler.get_scale() < scale_before:
            self.state.amp_skipped_steps += 1  # fp16 overflow: the scaler skipped this step
        b.scheduler.step()
        return total / count

    def gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """DDP all-reduces gradients in every backward; before the last micro-batch of a step the gradients
        only need to add up locally, so its no_sync() skips that communication (DDP's own recipe)."""
        no_sync = getattr(self.b.net, "no_sync", None)  # a DDP module (or a compiled one around it)
        return contextlib.nullcontext() if last or no_sync is None else no_sync()

    def check_finite(self, loss: float) -> None:
        if math.isfinite(loss):
            return
        if self.b.amp == torch.float16 and self.state.amp_skipped_steps < 50:
            return  # fp16 overflow: the scaler skips the step and lowers its scale
        last = self.run_dir / ckpt.CHECKPOINT
        where = f"last good checkpoint: {last}" if last.exists() else "no checkpoint was saved yet"
        raise RunDiverged(f"loss became {loss} at step {self.state.step}; {where}")

    def validated(self) -> bool:
        """Whether the history holds the current step's validation."""
        return any(entry["step"] == self.state.step for entry in self.state.history)

    def validate(self, writer, surface: bool = False) -> ValResult:
        """Score the model as model.eval() runs it; keep the best weights. `surface`: the final evaluation
        (HD95, error locations and the largest-component remedy too).

        The history gets one entry per step: a validation done again (a resumed run redoes the final
        evaluation that a stop or a kill interrupted) replaces the step's entry with the same numbers."""
        b, s = self.b, self.state
        what = "the final evaluation" if surface else "validation"
        log.info("step %d: %s on %d cases", s.step, what, len(b.data.val))
        with phase(what):
            distributed.broadcast_buffers(b.model)  # one model on every rank: rank 0's running statistics
            result = evaluate_built(b, b.model, surface=surface, lcc=surface)
        log_scores(writer, result, b.class_names, s.step)
        s.history = [entry for entry in s.history if entry["step"] != s.step]
        s.history.append({"step": s.step, "samples_seen": s.samples_seen, "val_dice": result.dice_mean})
        if result.dice_mean > s.best_val_dice:  # False for nan: no class present
            s.best_val_dice, s.best_step = result.dice_mean, s.step
            if distributed.is_main():
                ckpt.save(self.run_dir / ckpt.BEST_WEIGHTS, b.model.state_dict())
        return result

    def log_diagnostics(self, writer, monitor: BNStatMonitor, loss: float | None) -> None:
        s = self.state
        training = {
            "loss": loss,
            "loss_window_mean": self.close_loss_window(),
            "lr": self.b.scheduler.get_last_lr()[0],
        }
        if s.train_seconds > 0:
            training["samples_per_s"] = s.samples_seen / s.train_seconds
        log_training(writer, s.step, training, monitor.pop(), renorm_diagnostics(self.b.model))

    def close_loss_window(self) -> float:
        """The mean training loss since the last logging step, added to the loss history; a new window."""
        s = self.state
        mean = float(self.loss_window) / max(s.loss_window_steps, 1)
        s.loss_history.append({"step": s.step, "loss": mean if math.isfinite(mean) else None})
        self.loss_window = torch.zeros_like(self.loss_window)
        s.loss_window_steps = 0
        return mean

    def finish(self, writer, started: float) -> dict:
        """The final evaluation (HD95 too, and every BatchNorm evaluation mode), the weights and the record."""
        b = self.b
        final = self.validate(writer, surface=True)
        if final.absent:
            names = ", ".join(b.class_names[c - 1] for c in final.absent)
            log.warning("class(es) %s absent from every validation case: left out of the means", names)
        extra: dict[str, object] = {
            "val_dice": final.dice_mean,
            "val_dice_per_class": dict(zip(b.class_names, final.dice_per_class)),
            "val_hd95": final.hd95_mean,
            "val_hd95_per_class": dict(zip(b.class_names, final.hd95_per_class or [])),
            "absent_classes": [b.class_names[c - 1] for c in final.absent],
            "convergence": convergence(self.state.loss_history, self.plan.total_steps),
        }
        modes = {"running": final}  # running: model.eval(), what val_dice is
        if self.plan.spec.bn_family and self.cfg.trainer.eval_modes:
            modes = evaluate_bn_modes(b, final)
            extra["eval_modes"] = {mode: result.dice_mean for mode, result in modes.items()}
            extra["eval_modes_hd95"] = {mode: result.hd95_mean for mode, result in modes.items()}
            for mode, result in modes.items():
                log_scores(writer, result, b.class_names, self.state.step, suffix=f"_{mode}")
            log_mode_panel(writer, {m: r.example for m, r in modes.items()}, b.class_names, self.state.step)
        elif not self.plan.spec.bn_family:
            # No BatchNorm-family layer: every evaluation mode runs this same forward, so the mode scalars are
            # its score. Logged so that the HParams parallel-coordinates view, which leaves out runs that lack
            # a metric, shows every norm beside BatchNorm's modes.
            for mode in EVAL_MODES:
                log_scores(writer, final, b.class_names, self.state.step, suffix=f"_{mode}")
        if final.lcc is not None:  # the same predictions with each class's largest component kept
            modes = {**modes, "running_lcc": final.lcc}
        extra["per_case"] = {mode: result.per_case(b.class_names) for mode, result in modes.items()}
        self.save_checkpoint()
        if distributed.is_main():
            ckpt.save(self.run_dir / ckpt.FINAL_WEIGHTS, b.model.state_dict())
        if self.cfg.trainer.save_predictions:  # label maps per case and mode, to open in a viewer
            write_predictions(b, self.run_dir)  # after the weights: a failure here loses no training
        # The last stop point: once the record says completed, the run is complete (a signal after it is
        # too late to stop anything; the same command again would find nothing to do).
        with phase("the record"):
            stop_point_all_ranks()
        extra["wall_time_s"] = time.perf_counter() - started
        record = self.record(Status.COMPLETED, **extra)
        # TensorBoard's copy first, on disk before the record: once the record says completed, the same command
        # finds nothing to do, so a kill between the two lost the Final/ scalars and the HParams end for good.
        log_hparams(writer, record)  # the HParams view reads the Validation/ scalars
        log_final_scores(writer, record, self.state.step)
        writer.flush()
        return records.write_record(self, record)

    def stopped(self, where: str) -> None:
        """After SIGTERM/SIGINT: save a checkpoint and say so in the record, on every rank in step. `where`:
        the phase it stopped in. The checkpoint holds the state as it stands: the steps done and the history
        of the validations that finished; a resumed run redoes the phase that was cut (see loop, validate)."""
        self.save_checkpoint()
        self.write_record(Status.INTERRUPTED, "stopped by a signal; run the same command again to continue")
        who = f"rank {distributed.rank()}: " if self.plan.world_size > 1 else ""
        log.warning(
            "%sinterrupted at step %d during %s: checkpoint in %s", who, self.state.step, where, self.run_dir
        )
        distributed.barrier()  # no rank exits before rank 0 saved: torchrun stops the rest when one exits

    # -- checkpoints

    def save_checkpoint(self) -> None:
        if self.loss_window is not None:  # the open logging window's loss sum (a host sync: only here)
            self.state.loss_window_sum = float(self.loss_window)
        if distributed.is_main():  # every rank holds the same state; rank 0 writes it
            ckpt.save_run(self.run_dir / ckpt.CHECKPOINT, self.plan.run_id, self.b, self.state.__dict__)

    def restore_checkpoint(self) -> bool:
        path = self.run_dir / ckpt.CHECKPOINT
        if not path.exists() or self.cfg.trainer.overwrite:
            return False
        state = State(**ckpt.restore_run(path, self.b, trust=bool(self.cfg.trainer.trust_checkpoint)))
        now = self.b.data.preprocessing.get("dataset_files")
        # A generated dataset is a function of its parameters (part of the run's config).
        changed = state.dataset_files not in (None, now) and not is_generated(self.cfg.data)
        if changed and not self.cfg.trainer.force_resume:
            raise UserError(
                f"{path}: trained on other data than {self.b.data.info.root.absolute()} holds now (the training "
                f"cases' file names or sizes differ: {state.dataset_files} -> {now}); continuing would mix two "
                "datasets in one run: give the data it was trained on (a relative data.root is read from the "
                "current folder), or trainer.force_resume=true to continue on this data, or "
                "trainer.overwrite=true to start again"
            )
        self.state = state
        log.info("resuming %s from step %d/%d", self.run_dir, self.state.step, self.plan.total_steps)
        return True

    # -- the record (metrics.json): training/record.py builds and writes it

    def record(self, status: Status, error: str | None = None, **extra: object) -> dict:
        return records.of_run(self, status, error, **extra)

    def write_record(self, status: Status, error: str | None = None, **extra: object) -> dict:
        return records.write_run(self, status, error, **extra)

    def fail(self, message: str) -> None:
        records.fail_run(self, message)
