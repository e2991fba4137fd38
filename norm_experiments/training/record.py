"""The run's record, metrics.json, as this run writes it: built from the run's plan and state
(run_record.RunRecord), written atomically, and the one policy for failure records: a run that fails records
`failed` unless the folder holds another config's result; a run that fails before it started leaves a short
record; a record left `running` by a failure is settled to `failed` in place, even on a full disk."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from omegaconf import DictConfig

from norm_experiments import run_record
from norm_experiments.data.pipeline import dataset_name
from norm_experiments.errors import UserError
from norm_experiments.run_record import RunRecord, Status
from norm_experiments.training import checkpoint as ckpt
from norm_experiments.training import distributed
from norm_experiments.training.outputs import library_versions, machine, peak_rss_mb
from norm_experiments.training.run_folder import RunFolderBusy, locked

if TYPE_CHECKING:
    from norm_experiments.training.build import Built, Plan


class Run(Protocol):
    """What a run's record is made of: training/loop.Run is one (a protocol here, so that the record does not
    import the loop that writes it)."""

    run_dir: Path
    cfg: DictConfig
    plan: Plan
    built: Built | None
    state: Any  # loop.State: the counters, history and losses so far


def of_run(run: Run, status: Status, error: str | None = None, **extra: object) -> dict:
    """The run's record as it stands (run_record.RunRecord; `extra`: the final results)."""
    s, plan, cfg, device = run.state, run.plan, run.cfg, run.plan.device
    train_s = max(s.train_seconds, 1e-9)
    b = run.built
    seen = bool(s.samples_seen)
    return RunRecord(
        status=status,
        error=error,
        run_id=plan.run_id,
        run_name=run.run_dir.name,
        norm=plan.spec.name,
        norm_options=dict(plan.spec.options),
        group_layers=group_layers(b.model) if b else None,
        batch_dependent=plan.spec.uses_batch_statistics,
        bn_family=plan.spec.bn_family,
        model=str(cfg.model.name),
        seed=int(cfg.seed),
        batch_size=int(cfg.data.batch_size),
        patches_per_volume=int(cfg.data.patches_per_volume),
        effective_batch=plan.effective_batch,
        accumulate_steps=plan.accumulate_steps,
        world_size=plan.world_size,
        global_batch=plan.global_batch,
        bn_batch=plan.bn_batch,
        lr=b.lr if b else None,
        lr_scaling=str(cfg.optim.lr_scaling),
        dataset=dataset_name(cfg.data),
        intensity=str(cfg.data.intensity),
        budget_unit=str(cfg.trainer.budget_unit),
        samples_budget=plan.total_steps * plan.global_batch,
        samples_seen=s.samples_seen,
        steps=s.step,
        total_steps=plan.total_steps,
        best_val_dice=s.best_val_dice if s.best_step >= 0 else None,
        best_step=s.best_step if s.best_step >= 0 else None,
        samples_per_s=s.samples_seen / train_s if seen else None,
        data_wait_fraction=s.data_wait_seconds / train_s if seen else None,
        amp=str(b.amp).replace("torch.", "") if b and b.amp else "off",
        amp_skipped_steps=s.amp_skipped_steps,
        peak_memory_mb=peak_rss_mb(),
        # The run's own device: joblib workers on GPU k must not report GPU 0.
        peak_cuda_memory_mb=torch.cuda.max_memory_allocated(device) / 2**20
        if device.type == "cuda"
        else None,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        machine=machine(),
        versions=library_versions(),
        history=s.history,
        loss_history=s.loss_history,
        batch_stats_windows=batch_stats_windows(run),
        preprocessing=b.data.preprocessing if b else None,
        **extra,
    ).to_json()


def group_layers(model: torch.nn.Module) -> dict | None:
    """How the network's GroupNorm layers group their channels (None: it has none)."""
    found = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    if not found:
        return None
    groups = [m.num_groups for m in found]
    per_group = [m.num_channels // m.num_groups for m in found]
    return {
        "layers": len(found),
        "groups": [min(groups), max(groups)],
        "channels_per_group": [min(per_group), max(per_group)],
    }


def batch_stats_windows(run: Run) -> int | None:
    """Windows per forward in the "batch" evaluation mode (see Inference.for_mode); None when the run
    scores no BatchNorm evaluation modes."""
    trainer = run.cfg.trainer
    if not (run.plan.spec.bn_family and trainer.eval_modes):
        return None
    return int(trainer.batch_stats_windows or trainer.sw_batch_size)


def write_run(run: Run, status: Status, error: str | None = None, **extra: object) -> dict:
    return write_record(run, of_run(run, status, error, **extra))


def write_record(run: Run, record: dict) -> dict:
    """Write a record of_run built (the main rank only); UserError naming the file when it cannot."""
    if distributed.is_main():
        try:
            run_record.write(run.run_dir, record)
        except OSError as err:  # e.g. a full disk, or a folder where metrics.json should be
            path = run_record.path_in(run.run_dir)
            raise UserError(f"could not write {path}: {err.strerror or err}") from err
    return record


def fail_run(run: Run, message: str) -> None:
    """Mark the run failed; never replaces the record of another config's result (a completed run, or
    one with a checkpoint that trainer.force_resume or trainer.overwrite was about to take over)."""
    if not distributed.is_main():
        return
    previous = run_record.read(run.run_dir) or {}
    has_result = previous.get("status") == Status.COMPLETED or (run.run_dir / ckpt.CHECKPOINT).exists()
    if previous.get("run_id") not in (None, run.plan.run_id) and has_result:
        return
    try:
        if run.built is not None:
            write_run(run, Status.FAILED, message)
        else:
            record_failure(run.cfg, run.run_dir, message)
    except OSError:
        pass  # the folder itself may be the problem (read-only, full); the error is still reported


def record_failure(cfg: DictConfig, run_dir: Path, message: str) -> None:
    """Leave an honest record of a run that failed before it started (e.g. an impossible config in a
    sweep), so the sweep and its report show the cell as failed. Never touches an existing record."""
    from norm_experiments.run_names import run_identity

    if not distributed.is_main() or run_record.path_in(run_dir).exists():
        return
    record = RunRecord(
        status=Status.FAILED,
        error=message,
        run_name=run_dir.name,
        norm=str(cfg.norm.name),
        model=str(cfg.model.name),
        seed=int(cfg.seed),
        batch_size=int(cfg.data.batch_size),
        patches_per_volume=int(cfg.data.patches_per_volume),
    )
    try:
        record.run_id = run_identity(cfg)
        run_record.write(run_dir, record.to_json(keep_none=False))
    except (OSError, ValueError):
        pass  # an unwritable folder or an unresolvable config: the error is still reported


_RUNNING, _FAILED = b'"status": "running"', b'"status": "failed" '  # the same length: see settle_record


def settle_record(cfg: DictConfig, run_dir: Path) -> None:
    """After a failure this process saw: a record of this run still saying `running` (its failed record
    could not be written, e.g. on a full disk) is turned into `failed` in place. Same-length bytes written
    over the file's own need no free space; a record that looked alive would otherwise stay `running`."""
    from norm_experiments.run_names import run_identity

    if not distributed.is_main():
        return
    path = run_record.path_in(run_dir)
    try:
        with contextlib.suppress(RunFolderBusy), locked(run_dir):  # not while another process holds it
            record = run_record.read(run_dir)
            if run_record.status_of(record) != Status.RUNNING or record.get("run_id") != run_identity(cfg):
                return
            data = path.read_bytes()
            if data.count(_RUNNING) == 1:
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.pwrite(fd, _FAILED, data.index(_RUNNING))
                finally:
                    os.close(fd)
    except (OSError, ValueError):
        pass  # a folder that cannot be written at all: the error line still says what happened
