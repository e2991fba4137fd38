"""A sweep's progress on the console: one line when a run starts, one when it ends (its score, runs done of
total, the sweep's ETA), and each run's status at its validations; the runs' step lines stay in their
train.log.

The runs of a joblib sweep are other processes: they count what is done through a small file in the sweep
folder (one line appended per run started or finished, an atomic O_APPEND write), so the count is right
whichever process finishes first. The total is the sweep's number of runs, set when the sweep starts (the
study sweeper adds each look's runs when it launches them).
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from norm_experiments import run_record
from norm_experiments.errors import USER_ERROR_EXIT, UserError

PLAN = ".progress.json"  # {"started": unix time, "total": runs}: written by the sweep's main process
SWEEP_LOCK = ".sweep.lock"  # flock held by the sweep's main process; says "process PID on HOST"
# Lines appended by the runs: "dir PATH", "at TIME NAME", "start NAME", "skip NAME", "end NAME".
EVENTS = ".progress.log"
BOOKKEEPING = (PLAN, EVENTS, SWEEP_LOCK)  # a folder holding only these is still an empty one to a new sweep


def start(sweep_dir: Path, total: int | None) -> None:
    """A new sweep (or a resumed one): the clock and the count start again."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    _write_plan(sweep_dir, {"started": time.time(), "total": total})
    (sweep_dir / EVENTS).write_text("")


def add_runs(sweep_dir: Path, runs: int) -> None:
    """A study's next look launches `runs` more runs."""
    plan = _read_plan(sweep_dir)
    plan["total"] = (plan.get("total") or 0) + runs
    _write_plan(sweep_dir, plan)


def _write_plan(sweep_dir: Path, plan: dict) -> None:
    tmp = sweep_dir / f"{PLAN}.tmp"
    tmp.write_text(json.dumps(plan))
    os.replace(tmp, sweep_dir / PLAN)


def _read_plan(sweep_dir: Path) -> dict:
    try:
        plan = json.loads((sweep_dir / PLAN).read_text())
    except (OSError, ValueError):
        return {}
    return plan if isinstance(plan, dict) else {}


def _append(sweep_dir: Path, line: str) -> None:
    fd = os.open(sweep_dir / EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line.replace("\n", " ") + "\n").encode())
    finally:
        os.close(fd)


def _first_trained_start(sweep_dir: Path) -> float | None:
    """When the first run of this sweep that was not skipped started ("at TIME NAME" lines): a resumed sweep's
    ETA is timed from there, not through the seconds it spent skipping its completed runs."""
    try:
        lines = (sweep_dir / EVENTS).read_text().splitlines()
    except OSError:
        return None
    skipped = {line[5:] for line in lines if line.startswith("skip ")}
    times = []
    for line in lines:
        if line.startswith("at "):
            stamp, _, name = line[3:].partition(" ")
            try:
                if name not in skipped:
                    times.append(float(stamp))
            except ValueError:
                continue
    return min(times) if times else None


def _counts(sweep_dir: Path) -> tuple[int, int, int]:
    """(runs started, runs finished, runs finished without training: skipped) so far in this sweep."""
    try:
        lines = (sweep_dir / EVENTS).read_text().splitlines()
    except OSError:
        return 0, 0, 0
    # Distinct runs: a run of a killed sweep's leftover worker (a joblib process finishing its job after its
    # parent was killed) ends once more, after this sweep started again: counted it made "run 3 of 2" (150 %).
    started = {line[6:] for line in lines if line.startswith("start ")}
    ended = {line[4:] for line in lines if line.startswith("end ")} & started
    skipped = {line[5:] for line in lines if line.startswith("skip ")} & ended
    return len(started), len(ended), len(skipped)


def trained_runs(sweep_dir: Path) -> int:
    """Runs of this sweep that ended after training (or failing), not skipped as already completed."""
    _, ended, skipped = _counts(sweep_dir)
    return ended - skipped


def launched(sweep_dir: Path) -> set[Path] | None:
    """The run folders this sweep started (None: not recorded, e.g. the events file is gone)."""
    try:
        lines = (sweep_dir / EVENTS).read_text().splitlines()
    except OSError:
        return None
    return {Path(os.path.abspath(line[4:])) for line in lines if line.startswith("dir ")}


def duration(seconds: float) -> str:
    """'45 s', '6 min', '1 h 05 min': the precision an ETA has."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def started_line(sweep_dir: Path, name: str, run_dir: Path | None = None) -> str:
    if run_dir is not None:  # which folders this sweep ran: its end counts those, not every run in the folder
        _append(sweep_dir, f"dir {run_dir}")
    _append(sweep_dir, f"at {time.time():.3f} {name}")
    _append(sweep_dir, f"start {name}")
    started, done, _ = _counts(sweep_dir)
    total = _read_plan(sweep_dir).get("total")
    of = f" of {total}" if total else ""
    return f"[sweep] run {started}{of} started: {name} ({started - done} running, {done} done)"


def finished_line(sweep_dir: Path, name: str, outcome: str, skipped: bool = False) -> str:
    """'[sweep] run k of N done: NAME  OUTCOME  (k/N, elapsed, ETA)'; k counts runs finished. The ETA is
    the time per run that trained in this sweep: a run skipped as already completed takes a second, and
    counted in the rate it made the ETA of a resumed sweep a fraction of the time left."""
    if skipped:
        _append(sweep_dir, f"skip {name}")
    _append(sweep_dir, f"end {name}")
    started, done, skips = _counts(sweep_dir)
    plan = _read_plan(sweep_dir)
    total, began = plan.get("total"), plan.get("started")
    elapsed = time.time() - began if isinstance(began, (int, float)) else None
    of = f" of {total}" if total else ""
    where = [f"{100 * done / total:.0f} %"] if total else []
    if elapsed is not None:
        where.append(f"{duration(elapsed)} elapsed")
        first = _first_trained_start(sweep_dir)
        if total and done < total and done > skips and first is not None:
            where.append(f"ETA {duration((time.time() - first) / (done - skips) * (total - done))}")
    if skipped:
        outcome = f"skipped, already completed ({outcome})"
    return f"[sweep] run {done}{of} done: {name}  {outcome}  ({', '.join(where)})"


def trained_before(config: DictConfig, sweep_dir: Path) -> bool:
    """The run's record was completed before this sweep started: the run was skipped, not trained now."""
    began = _read_plan(sweep_dir).get("started")
    record = Path(str(config.hydra.runtime.output_dir)) / run_record.FILENAME
    try:
        return isinstance(began, (int, float)) and record.stat().st_mtime < began
    except OSError:
        return False


def outcome(job_return: JobReturn) -> str:
    """The run's score, or why it has none."""
    if job_return.status != JobStatus.COMPLETED:
        return f"crashed ({type(job_return._return_value).__name__})"
    value = job_return.return_value
    if isinstance(value, float) and math.isnan(value):
        return "failed (its metrics.json says why)"
    return f"val_dice={value:.4f}" if isinstance(value, (int, float)) else "done"


def sweep_size(config: DictConfig) -> int | None:
    """How many runs the basic sweeper launches: the product of the sweeps' lengths (None if unknown)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    try:
        overrides = OverridesParser.create().parse_overrides(arguments)
        size = 1
        for override in overrides:
            if override.is_sweep_override():
                size *= len(list(override.sweep_string_iterator()))
    except Exception:  # noqa: BLE001 - a glob over group options, a sweeper of its own: no total shown
        return None
    return size


class _QuietSteps(logging.Filter):
    """On the console of a sweep's run: its info lines are left to train.log, except the step lines that
    bring a new validation score or a new quarter of the run (its live status); warnings and errors pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or getattr(record, "status_line", False)


def hold_sweep_lock(sweep_dir: Path) -> int:
    """An exclusive flock on the sweep folder's lock file, held while the returned descriptor is open (the
    sweep's end closes it); UserError naming the holder when another sweep holds it. Two sweeps of one folder at once
    truncated each other's progress file and ran into each other's run folders (a refused run reported as
    failed, exit 0)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(sweep_dir / SWEEP_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = run_record.read_holder(os.read(fd, 512).decode(errors="replace"))
        os.close(fd)
        raise UserError(
            f"{sweep_dir} is in use by the sweep of {holder}: one sweep at a time per sweep folder; wait for it to "
            "end (the same command then finishes what it left), stop it, or use another name="
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{run_record.holder_line()}\n".encode())
    except OSError:
        pass  # a full disk: the lock holds without the line (as a run folder's does)
    return fd


class SweepProgress(Callback):
    """Hydra callback (configs/hydra/default.yaml): the sweep's progress lines."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from norm_experiments.command_line import sweep_folder_problem

        problem = sweep_folder_problem(config)  # before Hydra's sweeper writes multirun.yaml
        if problem is None:
            try:
                self.lock = hold_sweep_lock(Path(config.hydra.sweep.dir))
            except (UserError, OSError) as err:
                problem = str(err) if isinstance(err, UserError) else f"cannot lock the sweep folder: {err}"
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(USER_ERROR_EXIT)
        if config.hydra.sweeper.get("study") is None:  # the study sweeper starts it once its checks pass
            start(Path(config.hydra.sweep.dir), sweep_size(config))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        lock = getattr(self, "lock", None)
        if lock is not None:  # a later sweep in this same process (a test, a notebook) may take the folder
            os.close(lock)
            self.lock = None

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not _in_sweep(config):
            return
        for handler in logging.getLogger().handlers:  # Hydra configured the job's logging just before
            if type(handler) is logging.StreamHandler:
                handler.addFilter(_QuietSteps())
        run_dir = Path(os.path.abspath(str(config.hydra.runtime.output_dir)))
        _say(lambda: started_line(Path(config.hydra.sweep.dir), _name(config), run_dir))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not _in_sweep(config):
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        value = job_return.return_value if job_return.status == JobStatus.COMPLETED else None
        scored = isinstance(value, (int, float)) and not math.isnan(value)
        skipped = scored and trained_before(config, sweep_dir)
        _say(lambda: finished_line(sweep_dir, _name(config), outcome(job_return), skipped))


def _in_sweep(config: DictConfig) -> bool:
    return str(config.hydra.mode).endswith("MULTIRUN")


def _name(config: DictConfig) -> str:
    """The run by its swept values (norm=group,seed=1), without what every run of the sweep shares."""
    from norm_experiments.run_names import SWEPT_KEYS_ENV

    swept = set(filter(None, os.environ.get(SWEPT_KEYS_ENV, "").split(",")))
    own = [o for o in config.hydra.overrides.task if o.split("=", 1)[0].lstrip("+~") in swept]
    return ",".join(own) or Path(str(config.hydra.runtime.output_dir)).name


def _say(line) -> None:
    """Print a progress line; a sweep folder that cannot be written costs the line, not the run."""
    try:
        print(line(), flush=True)
    except OSError as err:
        print(f"[sweep] progress not counted: {err}", file=sys.stderr)
