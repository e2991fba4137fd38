"""`norm-exp-train` (also `python -m norm_experiments.train`): one training run, or a sweep with -m.

    norm-exp-train norm=group data.batch_size=2 seed=3
    norm-exp-train -m experiment=norm_sweep_quick
    norm-exp-train resume=outputs/runs/norm=group,data.batch_size=2
    torchrun --nproc_per_node=4 -m norm_experiments.train norm=syncbatch data.batch_size=1   # DDP, 4 GPUs

Exit status: 0 completed (or already completed), 2 a mistake in the config or the data (one `error:` line),
3 interrupted by SIGTERM/SIGINT with a checkpoint saved (run the same command to continue), 4 diverged.
In a multirun, a failing run is recorded in its metrics.json and the sweep goes on.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from norm_experiments.config import CONFIG_DIR, output_dir_problem, register_resolvers
from norm_experiments.errors import USER_ERROR_EXIT, UserError
from norm_experiments.training import distributed
from norm_experiments.training.loop import (
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    RunDiverged,
    RunInterrupted,
    record_failure,
    train,
)

log = logging.getLogger("norm_experiments.train")

register_resolvers()

# Ranks other than 0 of a torchrun launch leave the run dir to rank 0: no .hydra/ copy, no log file, warnings
# only (on stdout). These are Hydra overrides: they change neither the run dir's name nor the run's identity.
OTHER_RANK_OVERRIDES = [
    "hydra.output_subdir=null",
    "hydra/job_logging=stdout",
    "hydra.job_logging.root.level=WARNING",
]


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def hydra_main(cfg: DictConfig) -> float:
    """Hydra task: returns the final validation Dice, the number a sweeper (e.g. Optuna) optimizes."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    _check_distributed_launch(in_sweep, run_dir)
    try:
        metrics = train(cfg, run_dir, job_num=hydra_cfg.job.num if in_sweep else 0)
    except RunInterrupted:
        sys.exit(EXIT_INTERRUPTED)  # stops a sweep too: the user or the scheduler asked to stop
    except (UserError, RunDiverged) as err:
        if in_sweep:  # recorded in metrics.json; the other runs of the sweep go on
            log.error("%s: %s", run_dir.name, err)
            record_failure(cfg, run_dir, str(err))
            return math.nan
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_DIVERGED if isinstance(err, RunDiverged) else USER_ERROR_EXIT)
    except Exception:
        if not in_sweep:
            raise
        log.exception("%s failed", run_dir.name)  # a crash, not a user mistake: keep its traceback
        record_failure(cfg, run_dir, f"{sys.exc_info()[0].__name__}: {sys.exc_info()[1]}")
        return math.nan
    if not in_sweep and distributed.is_main():
        _print_summary(metrics, run_dir)
    return float(metrics.get("val_dice") or math.nan)


def _check_distributed_launch(in_sweep: bool, run_dir: Path) -> None:
    """Under torchrun: one run (no sweep) in the same folder on every rank; otherwise exit 2."""
    if not distributed.is_distributed():
        return
    problem = None
    if in_sweep:
        problem = (
            "a torchrun launch trains one run, not a sweep (-m): start one torchrun per run "
            "(e.g. one SLURM job each, see scripts/slurm_torchrun.sbatch)"
        )
    elif not distributed.same_on_all_ranks(str(run_dir)):
        problem = (
            f"ranks resolved different run folders (rank {distributed.rank()}: {run_dir}); set hydra.run.dir"
        )
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)


def _print_summary(metrics: dict, run_dir: Path) -> None:
    modes = metrics.get("eval_modes") or {}
    line = f"val_dice={metrics.get('val_dice', float('nan')):.4f} (eval mode)"
    if modes:
        line += "  " + "  ".join(f"{mode}={dice:.4f}" for mode, dice in modes.items())
    print(line)
    print(f"results: {run_dir / 'metrics.json'}   tensorboard --logdir {run_dir.parent}")


def resume_argv(argv: list[str]) -> list[str]:
    """Turn `resume=RUN_DIR` into that run's own overrides plus hydra.run.dir=RUN_DIR.

    Hydra cannot resume by itself; re-running the saved command in the same folder lets the training code
    find the checkpoint there and continue.
    """
    resume = [a for a in argv[1:] if a.startswith("resume=")]
    if not resume:
        return argv
    run_dir = Path(resume[-1].split("=", 1)[1]).expanduser()
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        raise UserError(f"resume={run_dir}: not a run folder (no {saved})")
    overrides = [str(o) for o in OmegaConf.load(saved) if not str(o).startswith("hydra.run.dir=")]
    # Hydra writes only the task's overrides there: a Hydra setting (e.g. a callback's _target_, which Hydra
    # would import and call) means a crafted file. The trust opt-in is never replayed: it holds for one load.
    crafted = [o for o in overrides if o.lstrip("+~").startswith(("hydra.", "hydra/"))]
    if crafted:
        raise UserError(f"resume={run_dir}: {saved} sets {crafted[0]}, which a run's overrides never do")
    overrides = [o for o in overrides if not o.lstrip("+~").startswith("trainer.trust_checkpoint=")]
    rest = [a for a in argv[1:] if not a.startswith("resume=")]
    # hydra.mode=RUN: a run of a sweep preset is resumed alone, not its whole sweep.
    # Quoted: run folder names hold '=' and ',' that Hydra's override grammar would otherwise parse.
    quoted = str(run_dir).replace("\\", "\\\\").replace("'", "\\'")
    return [argv[0], *overrides, *rest, "hydra.mode=RUN", f"hydra.run.dir='{quoted}'"]


def main() -> None:
    try:
        distributed.setup()  # under torchrun: join the other ranks (one process per GPU); else nothing
        sys.argv = resume_argv(sys.argv)
        problem = output_dir_problem(sys.argv[1:])
        if problem:
            raise UserError(problem)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
    try:
        distributed.barrier()  # all ranks have read resume='s overrides before rank 0's Hydra rewrites them
        if not distributed.is_main():
            sys.argv += OTHER_RANK_OVERRIDES
        hydra_main()
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main()
