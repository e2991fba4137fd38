"""Hydra callback: at the end of a multirun, say what happened to each cell and write the sweep's report.

Hydra cannot resume a multirun; ours resumes because every run folder is named after its overrides and the
training code skips completed runs, continues interrupted ones and re-runs failed ones. This callback counts
which of those happened (a run whose metrics.json predates the sweep's start was skipped) and turns the
sweep folder into report.md, results.csv and plots.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from norm_experiments import run_record, safe_io
from norm_experiments.errors import USER_ERROR_EXIT, UserError
from norm_experiments.run_names import SWEPT_KEYS_ENV, swept_keys

log = logging.getLogger("norm_experiments.sweep")


def sweep_status(sweep_dir: Path, started: float, only: set[Path] | None = None) -> Counter:
    """Count runs below sweep_dir by status (of the run folders in `only`, when given); completed runs
    untouched since `started` count as skipped."""
    counts: Counter = Counter()
    for path in sorted(sweep_dir.rglob(run_record.FILENAME)):
        if only is not None and Path(os.path.abspath(path.parent)) not in only:  # abspath: "a/../b" as b
            continue
        status = run_record.status_of(run_record.read(path.parent) or {"status": "unreadable"}) or "unknown"
        if status == run_record.Status.COMPLETED and path.stat().st_mtime < started:
            status = "skipped (already completed)"
        counts[status] += 1
    return counts


def write_multirun_yaml(config: DictConfig) -> None:
    """Write the sweep's multirun.yaml before Hydra's sweeper does (the same file, the same config): a disk
    that filled up after the free-space check then fails here with one line and exit 2, not with Hydra's
    traceback; Hydra's own write then replaces the file with the same bytes."""
    path = Path(config.hydra.sweep.dir) / "multirun.yaml"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(config, path)
    except OSError as err:
        print(f"error: could not write {path}: {safe_io.os_reason(err)}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)


class SweepReport(Callback):
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.started = time.time()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()
        # The jobs' folder names put the swept keys first (run_names.py); a job's config no longer
        # shows which of its command-line overrides were sweeps, so they travel in the environment.
        keys = swept_keys(config.hydra.overrides.task, config.hydra.sweeper.get("params"))
        if (
            config.hydra.sweeper.get("study") is not None
        ):  # the study sweeper's grid and seeds (sweep/study.py)
            keys += [k for k in ("norm", "data.batch_size", "seed") if k not in keys]
        os.environ[SWEPT_KEYS_ENV] = ",".join(keys)
        if config.hydra.sweeper.get("study") is None:  # the study sweeper writes it once its checks pass
            write_multirun_yaml(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from norm_experiments.sweep.progress import launched

        sweep_dir = Path(config.hydra.sweep.dir)
        ran = launched(sweep_dir)
        every = sweep_status(sweep_dir, self.started)
        counts = sweep_status(sweep_dir, self.started, ran) if ran else every
        others = sum(every.values()) - sum(counts.values())
        more = (
            f"; the folder holds {others} more run(s) of earlier sweeps, which its report includes"
            if others
            else ""
        )
        log.info(
            "sweep %s: %s%s",
            sweep_dir,
            ", ".join(f"{n} {status}" for status, n in sorted(counts.items())),
            more,
        )
        if not self.enabled:
            return
        end_of_sweep_report(sweep_dir)


# The first line of a report.md whose end-of-sweep report failed afterwards (mark_stale).
STALE_MARK = "> **Stale report.**"
STALE_COPY = "report.stale.md"  # where report.md goes when even the note cannot be written (a full disk)


def end_of_sweep_report(sweep_dir: Path) -> None:
    """Write the sweep's report; print its table and where it is.

    Hydra calls on_multirun_end inside a catch-all that turns any exception into a warning and the sweep's
    exit status into 0, while the previous report.md would stay in place looking current. So a failure here
    marks that report.md stale (mark_stale), prints one `error:` line and ends the sweep command with exit
    status 2 (5 for an internal error): SystemExit is not an Exception, Hydra lets it through."""
    from norm_experiments.errors import EXIT_CRASHED, StdoutError
    from norm_experiments.report import write_report

    try:
        report = write_report([sweep_dir])
    except Exception as err:  # every failure must end the sweep with a status (see above)
        if isinstance(err, UserError):
            reason, status = str(err), USER_ERROR_EXIT
        elif isinstance(err, OSError):
            where = f"{err.filename}: " if err.filename else ""
            reason, status = f"cannot write the report: {where}{safe_io.os_reason(err)}", USER_ERROR_EXIT
        else:  # a bug: norm-exp-report SWEEP_DIR shows its traceback
            reason = (
                f"internal error ({type(err).__name__}: {err}); norm-exp-report {sweep_dir} shows it again"
            )
            status = EXIT_CRASHED
        reason = " ".join(reason.split())[:500]
        print(
            f"error: end-of-sweep report failed: {reason}; {mark_stale(sweep_dir, reason)}", file=sys.stderr
        )
        sys.exit(status)
    try:
        print(report.table)
        print(
            f"report: {sweep_dir / 'report.md'} (report.html, results.csv, runs.csv, summary.json and plots "
            "beside it)"
        )
        sys.stdout.flush()
    except StdoutError as err:  # the report is written; only its table could not be shown
        print(f"error: {err}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)


def mark_stale(sweep_dir: Path, reason: str) -> str:
    """Put one line at the top of the sweep's previous report.md saying that it is stale and why (replacing
    such a line from an earlier failure); where that cannot be written (a full disk), rename report.md to
    report.stale.md. The CSVs and plots stay: the note names them. Returns what was done, for the error line."""
    path = sweep_dir / "report.md"
    if not path.is_file():
        return "no earlier report.md was there"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    note = (
        f"{STALE_MARK} The end-of-sweep report of {when} failed ({reason}): this report.md, and results.csv, "
        f"runs.csv and the plots beside it, are from an earlier report and leave out that sweep's runs. Fix "
        f"the cause and run `norm-exp-report {sweep_dir}`."
    )
    try:
        text = safe_io.read_text(path, safe_io.MAX_JSON_BYTES)
        first, newline, rest = text.partition("\n")
        body = rest if first.startswith(STALE_MARK) else text
        run_record.write_atomic(path, f"{note}\n\n{body.lstrip(chr(10))}".encode())
        return f"the previous {path} is marked stale in its first line"
    except (OSError, ValueError):
        pass
    try:
        os.replace(path, sweep_dir / STALE_COPY)
        return f"the previous report.md is renamed {sweep_dir / STALE_COPY}"
    except OSError as err:
        return f"the previous {path} could not be marked stale ({safe_io.os_reason(err)}): it is out of date"
