"""What a run folder may hold when a run starts, and what to do with it: skip a completed run, continue an
interrupted one, retrain a failed one, and refuse to touch a folder that holds another config's result."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from norm_experiments import run_record
from norm_experiments.errors import UserError
from norm_experiments.run_record import Status
from norm_experiments.training import checkpoint as ckpt
from norm_experiments.training import distributed

RUN_CONFIG = (
    "run_config.yaml"  # the resolved config this run's checkpoint belongs to (Hydra rewrites .hydra/)
)


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
