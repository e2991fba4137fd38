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
from norm_experiments.sweep.run_names import SWEPT_KEYS_ENV, swept_keys

log = logging.getLogger("norm_experiments.sweep")


def sweep_status(sweep_dir: Path, started: float) -> Counter:
    """Count runs below sweep_dir by status; completed runs untouched since `started` count as skipped."""
    counts: Counter = Counter()
    for path in sorted(sweep_dir.rglob(run_record.FILENAME)):
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
        # The jobs' folder names put the swept keys first (sweep/run_names.py); a job's config no longer
        # shows which of its command-line overrides were sweeps, so they travel in the environment.
        keys = swept_keys(config.hydra.overrides.task, config.hydra.sweeper.get("params"))
        if (
            config.hydra.sweeper.get("study") is not None
        ):  # the study sweeper's grid and seeds (sweep/study.py)
            keys += [k for k in ("norm", "data.batch_size", "seed") if k not in keys]
        os.environ[SWEPT_KEYS_ENV] = ",".join(keys)
        write_multirun_yaml(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        counts = sweep_status(sweep_dir, self.started)
        log.info(
            "sweep %s: %s", sweep_dir, ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        )
        if not self.enabled:
            return
        from norm_experiments.report import write_report

        try:
            report = write_report([sweep_dir])
        except UserError as err:
            log.error("report: %s", err)
            return
        print(report.table)
        print(f"report: {sweep_dir / 'report.md'} (results.csv, runs.csv and plots beside it)")
