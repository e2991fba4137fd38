"""What a run folder may hold when a run starts, and what to do with it: skip a completed run, continue an
interrupted one, retrain a failed one, and refuse to touch a folder that holds another config's result.
One process at a time: a run holds an exclusive lock on its folder from before it reads it until it ends."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from norm_experiments import run_record
from norm_experiments.errors import UserError
from norm_experiments.run_record import Status
from norm_experiments.training import checkpoint as ckpt
from norm_experiments.training import distributed

RUN_CONFIG = (
    "run_config.yaml"  # the resolved config this run's checkpoint belongs to (Hydra rewrites .hydra/)
)


LOCK = ".lock"  # holds the PID and host of the process that holds (or last held) the folder's lock


class RunFolderBusy(UserError):
    """Another process holds the run folder's lock: this process must not read or write the folder."""


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on run_dir while the block runs, or raise RunFolderBusy naming the holder.

    flock: the operating system releases it when the holding process ends in any way (kill -9 included),
    so a stale lock cannot exist and the lock file is never removed. Under torchrun rank 0 takes it for every
    rank; a refusal on rank 0 is raised on every rank, so that none waits for the others forever.
    """
    handle, holder = None, "another process"
    if distributed.is_main():
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            handle = open(run_dir / LOCK, "a+", encoding="utf-8")  # held until the block ends
        except OSError as err:
            raise UserError(f"cannot lock {run_dir / LOCK}: {err.strerror or err}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            handle = None
    if distributed.any_rank(distributed.is_main() and handle is None):
        who = holder if distributed.is_main() else "another process (rank 0 could not lock it)"
        raise RunFolderBusy(
            f"{run_dir} is in use by {who}: one run at a time per run folder; wait for it to end, stop it, "
            "or use another hydra.run.dir"
        )
    try:
        if handle is not None:
            handle.truncate(0)
            handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
        yield
    finally:
        if handle is not None:
            handle.close()  # closing the file releases the lock


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

    Returns the previous record when that run completed with this very config (nothing to do). Raises
    UserError when the folder holds a run of a different config, because continuing or overwriting it would
    lose a result. Returns None when the run should start or continue from its checkpoint.
    """
    if cfg.trainer.overwrite:
        return None
    previous = run_record.read(run_dir)
    if previous is None:
        return None
    completed = previous.get("status") == Status.COMPLETED
    if previous.get("run_id") == run_id:
        return previous if completed else None
    has_result = completed or (run_dir / ckpt.CHECKPOINT).exists()
    if not has_result:
        return None  # a run that failed before saving anything: nothing to lose
    if cfg.trainer.force_resume and not completed:
        return None
    diff = []
    if (run_dir / RUN_CONFIG).exists():
        old = OmegaConf.to_container(OmegaConf.load(run_dir / RUN_CONFIG), resolve=True)
        diff = config_diff(old, OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    raise UserError(
        f"{run_dir} holds a {previous.get('status')} run of a different config "
        f"({'; '.join(diff[:6]) or 'see its run_config.yaml'}). Use another hydra.run.dir, "
        "trainer.overwrite=true to retrain in place (its result is lost), or trainer.force_resume=true "
        "to continue an unfinished run with the new config"
    )


def save_config(cfg: DictConfig, run_dir: Path) -> None:
    if distributed.is_main():
        OmegaConf.save(cfg, run_dir / RUN_CONFIG, resolve=True)


def save_hydra_files(cfg: DictConfig, run_dir: Path) -> None:
    """The .hydra/ folder Hydra would write (config.yaml, hydra.yaml, overrides.yaml), written here instead
    (configs/hydra/default.yaml sets hydra.output_subdir=null) by the process that holds the folder's lock and
    passed the identity check, so that a command refused on this folder (busy, or another config) cannot
    replace them: `resume=RUN_DIR` reads .hydra/overrides.yaml."""
    if not distributed.is_main() or not HydraConfig.initialized():  # e.g. a test calling loop.train()
        return
    hydra_cfg = HydraConfig.get()
    folder = run_dir / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, folder / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), folder / "hydra.yaml")
    OmegaConf.save(hydra_cfg.overrides.task, folder / "overrides.yaml")


def record_failure(cfg: DictConfig, run_dir: Path, message: str) -> None:
    """Leave an honest record of a run that failed before it started (e.g. an impossible config in a
    sweep), so the sweep and its report show the cell as failed. Never touches an existing record."""
    from norm_experiments.config import run_identity

    if not distributed.is_main() or run_record.path_in(run_dir).exists():
        return
    record = {
        "status": Status.FAILED,
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
        run_record.write(run_dir, record)
    except (OSError, ValueError):
        pass  # an unwritable folder or an unresolvable config: the error is still reported
