"""`norm-exp-train` (also `python -m norm_experiments.train`): one training run, or a sweep with -m.

    norm-exp-train norm=group data.batch_size=2 seed=3
    norm-exp-train -m experiment=norm_sweep_quick
    norm-exp-train resume=outputs/runs/norm=group,data.batch_size=2
    torchrun --nproc_per_node=4 -m norm_experiments.train norm=syncbatch data.batch_size=1   # DDP, 4 GPUs

Exit status: 0 completed (or already completed), 1 Hydra refused the command line, 2 a mistake in the config
or the data (one `error:` line), 3 interrupted by SIGTERM/SIGINT (checkpoint saved: run the same command to
continue), 4 diverged, 5 an internal error (a bug: one line, the traceback in crash.log of the run folder).
In a multirun, a failing or crashing run is recorded in its metrics.json and the sweep goes on.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from norm_experiments import safe_io
from norm_experiments.command_line import command_line_problem
from norm_experiments.config import (
    CONFIG_DIR,
    hydra_quote,
    output_dir_problem,
    path_argument,
    quoting_problem,
    register_resolvers,
    validate_config,
)
from norm_experiments.errors import (
    EXIT_CRASHED,
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    USER_ERROR_EXIT,
    StdoutError,
    UserError,
    flush_stdout,
    guard_stdout,
)
from norm_experiments.run_record import score_text
from norm_experiments.safe_io import argument_problem

# Imported where they are used, not here: they bring torch (seconds), which --help does not need.
# from norm_experiments.training import distributed; from norm_experiments.training.run_folder import ...
HELP_FLAGS = ("--help", "-h", "--hydra-help")

log = logging.getLogger("norm_experiments.train")

register_resolvers()

CRASH_LOG = "crash.log"  # in the run folder: the traceback of an internal error (exit status 5)

# Ranks other than 0 of a torchrun launch leave the run dir to rank 0: no log file, warnings only (on stdout;
# rank 0 alone writes .hydra/, see run_folder.save_hydra_files). These are Hydra overrides: they change
# neither the run dir's name nor the run's identity.
OTHER_RANK_OVERRIDES = [
    "hydra/job_logging=stdout",
    "hydra.job_logging.root.level=WARNING",
]


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def hydra_main(cfg: DictConfig) -> float:
    """Hydra task: returns the final validation Dice, the number a sweeper (e.g. Optuna) optimizes."""
    # Imported here, not at the top: the training code brings MONAI (seconds), which --help, --cfg and a
    # command line refused before Hydra starts do not need.
    from norm_experiments.training import distributed
    from norm_experiments.training.loop import RunDiverged, RunInterrupted, train
    from norm_experiments.training.record import record_failure, settle_record
    from norm_experiments.training.run_folder import RunFolderBusy

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    _check_distributed_launch(in_sweep, run_dir)
    link = safe_io.link_problem(run_dir) if run_dir.is_dir() else None
    if link:  # before the first write: its train.log, lock or .hydra/ could be a link to anywhere
        _close_log_files(run_dir)
        if in_sweep:
            log.error("%s: %s", run_dir.name, link)
            return math.nan
        print(f"error: {link}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
    try:
        metrics = train(cfg, run_dir, job_num=hydra_cfg.job.num if in_sweep else 0)
    except RunInterrupted:
        sys.exit(EXIT_INTERRUPTED)  # stops a sweep too: the user or the scheduler asked to stop
    except (UserError, RunDiverged) as err:
        if not isinstance(err, RunFolderBusy):  # that folder is another process's
            settle_record(cfg, run_dir)
        if in_sweep:  # recorded in metrics.json; the other runs of the sweep go on
            log.error("%s: %s", run_dir.name, err)
            if not isinstance(err, RunFolderBusy):
                record_failure(cfg, run_dir, str(err))
            return math.nan
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_DIVERGED if isinstance(err, RunDiverged) else USER_ERROR_EXIT)
    except Exception as err:  # a bug, not a user mistake: one line here, the traceback in a file
        settle_record(cfg, run_dir)
        line = crash_line(err, write_crash_log(err, run_dir))
        if not in_sweep:
            print(f"error: {line}", file=sys.stderr)
            sys.exit(EXIT_CRASHED)
        log.error("%s: %s", run_dir.name, line)
        record_failure(cfg, run_dir, f"internal error: {summary(err)}")
        return math.nan
    if not in_sweep and distributed.is_main():
        try:
            _print_summary(metrics, run_dir)
        except StdoutError as err:  # the run is complete and recorded; only its summary line is lost
            print(f"error: {err}", file=sys.stderr)
            sys.exit(USER_ERROR_EXIT)
    return sweep_value(metrics)


def _close_log_files(run_dir: Path) -> None:
    """Remove the log handlers that write into run_dir (Hydra's train.log, opened at its first line:
    configs/hydra/job_logging/run_log.yaml), so that nothing is written there."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if (
            isinstance(handler, logging.FileHandler)
            and Path(handler.baseFilename).parent == run_dir.absolute()
        ):
            root.removeHandler(handler)
            handler.close()


def sweep_value(metrics: dict) -> float:
    """What a run returns to Hydra's sweeper (the sweep's progress line shows it): its val_dice, NaN where it
    has none. A Dice of 0.0 is a result (no foreground predicted), not a failure."""
    value = metrics.get("val_dice")
    return math.nan if value is None else float(value)


def _check_distributed_launch(in_sweep: bool, run_dir: Path) -> None:
    """Under torchrun: one run (no sweep) in the same folder on every rank; otherwise exit 2."""
    from norm_experiments.training import distributed

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
    line = f"val_dice={score_text(metrics.get('val_dice'))} (eval mode)"
    if modes:
        line += "  " + "  ".join(f"{mode}={score_text(dice)}" for mode, dice in modes.items())
    print(line)
    print(f"results: {run_dir / 'metrics.json'}   tensorboard --logdir {_logdir(run_dir)}")


RUNS_FOLDER = "runs"  # configs/hydra/default.yaml: single runs go to outputs/runs/<overrides>


def _logdir(run_dir: Path) -> Path:
    """The folder whose TensorBoard shows this run beside its peers: the sweep a run of a sweep belongs to
    (the nearest folder above with a multirun.yaml), else the folder of the runs (outputs/runs). A run in a
    folder of the user's choosing (hydra.run.dir=/tmp/x) is named itself: TensorBoard would read every event
    file under its parent (/tmp, or a home folder)."""
    for folder in list(run_dir.parents)[:3]:  # a sweep's runs lie 1-2 folders below it (run_names.py)
        if (folder / "multirun.yaml").is_file():
            return folder
    return run_dir.parent if run_dir.parent.name == RUNS_FOLDER else run_dir


def summary(err: BaseException) -> str:
    """'Type: message' on one line."""
    message = " ".join(str(err).split())
    return f"{type(err).__name__}: {message[:300]}" if message else type(err).__name__


def crash_line(err: BaseException, log_file: Path | None) -> str:
    where = f"traceback in {log_file}" if log_file else "no file could be written for its traceback"
    return f"internal error ({summary(err)}); {where}"


def write_crash_log(err: BaseException, folder: Path | None) -> Path | None:
    """Append the traceback of an internal error to crash.log in the run folder, or (no run folder yet, or
    not writable) to a new temporary file; its path, or None when no file can be written."""
    text = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {shlex.join(sys.argv)}\n"
    text += "".join(traceback.format_exception(err)) + "\n"
    if folder is not None:
        try:
            with open(folder / CRASH_LOG, "a", encoding="utf-8") as f:
                f.write(text)
            return folder / CRASH_LOG
        except OSError:
            pass
    try:
        fd, name = tempfile.mkstemp(prefix="norm-exp-train-crash-", suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return Path(name)
    except OSError:
        return None


def _crash(err: BaseException) -> NoReturn:
    print(f"error: {crash_line(err, write_crash_log(err, None))}", file=sys.stderr)
    sys.exit(EXIT_CRASHED)


def _plan(cfg: DictConfig) -> None:
    """A single run's plan (the norm's options, the model's shapes, the device), worked out before Hydra
    creates the run folder, so that a refused run leaves no folder, log or lock behind."""
    from norm_experiments.data.pipeline import generator_config, is_generated
    from norm_experiments.training.build import make_plan

    make_plan(cfg)
    if is_generated(cfg.data):  # data.synthetic.* / data.brain.*: their parameters' own checks
        generator_config(cfg.data)


def resume_argv(argv: list[str]) -> list[str]:
    """Turn `resume=RUN_DIR` into that run's own overrides plus hydra.run.dir=RUN_DIR.

    Hydra cannot resume by itself; re-running the saved command in the same folder lets the training code
    find the checkpoint there and continue.
    """
    resume = [a for a in argv[1:] if a.startswith("resume=")]
    if not resume:
        return argv
    run_dir = path_argument(resume[-1])
    from norm_experiments.training.run_folder import replayable_overrides

    # Only plain key=value overrides of norm-exp-train's configs, never a one-time instruction or where to
    # write (run_folder.replayable_overrides): the folder may be someone else's, and its file becomes part of
    # this command line.
    rest = [a for a in argv[1:] if not a.startswith("resume=")]
    overrides = replayable_overrides(run_dir, CONFIG_DIR, "resume", rest)
    # hydra.mode=RUN: a run of a sweep preset is resumed alone, not its whole sweep.
    # Quoted: run folder names hold '=' and ',' that Hydra's override grammar would otherwise parse.
    return [argv[0], *overrides, *rest, "hydra.mode=RUN", f"hydra.run.dir={hydra_quote(str(run_dir))}"]


def main() -> None:
    if any(arg in HELP_FLAGS for arg in sys.argv[1:]):
        hydra_main()  # Hydra prints the help and exits: no torch, no checks
        return
    from norm_experiments.training import distributed

    # SIGTERM (a scheduler's preemption) outside the training loop stops the run as Ctrl-C does: with exit
    # status 3 and one line, instead of dying silently with 143. The loop installs its own handlers.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    guard_stdout()  # a closed pipe or a full disk on stdout: one line, not a traceback
    # A log line that cannot be written (a full disk under train.log, a closed stdout) is dropped instead
    # of printing logging's own traceback; the failures that matter are reported by the code that writes.
    logging.raiseExceptions = False
    try:
        distributed.setup()  # under torchrun: join the other ranks (one process per GPU); else nothing
        problem = argument_problem(sys.argv[1:])  # before resume= reads the folder it names
        if problem:
            raise UserError(problem)
        sys.argv = resume_argv(sys.argv)
        argv = sys.argv[1:]
        problem = argument_problem(argv) or quoting_problem(argv) or output_dir_problem(argv)
        # Before Hydra creates a folder: a wrong option, key or value is one line and leaves nothing behind.
        problem = problem or command_line_problem(argv, "train", validate_config, _plan)
        if problem:
            raise UserError(problem)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM while the command line is checked (imports take seconds)
        print("interrupted before the run started: nothing was written", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as err:
        _crash(err)
    try:
        distributed.barrier()  # all ranks have read resume='s overrides before rank 0's Hydra rewrites them
        if not distributed.is_main():
            sys.argv += OTHER_RANK_OVERRIDES
        hydra_main()
        flush_stdout()
    except KeyboardInterrupt:
        # Ctrl-C outside the training loop (while the data loads, say): nothing half-written to undo.
        print("interrupted: run the same command again to start or continue the run", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main()
