"""Find and read the metrics.json of every run below one or more sweep directories."""

from __future__ import annotations

import json
import math
import os
import socket
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from norm_experiments import run_record, safe_io
from norm_experiments.errors import UserError
from norm_experiments.report import schema

# Fields that define a condition of the study (the dataset, raw vs z-scored input, a budget in patches vs in steps): runs
# under different conditions are never averaged or compared with each other; each gets its own tables.
CONDITION_FIELDS = ("dataset", "intensity", "budget_unit")


# eq=False: runs are compared and hashed by identity (data is a dict, and two files are two runs).
@dataclass(frozen=True, eq=False)
class Run:
    """One run, as written by the training code to its metrics.json."""

    path: Path  # the metrics.json file
    mtime: float  # modification time of the file: "newest" when a run_id repeats
    data: dict[str, Any]

    @property
    def status(self) -> str:
        return str(self.data["status"])

    @property
    def completed(self) -> bool:
        return self.status == run_record.Status.COMPLETED

    @cached_property
    def gone(self) -> str | None:
        """For a record that says running: 'process N on HOST', when the process that held its folder was of
        this machine and no longer exists (the run was killed); else None (still running, or cannot tell)."""
        if self.status != run_record.Status.RUNNING:
            return None
        return _holder_gone(self.path.parent)

    @property
    def norm(self) -> str:
        return str(self.data["norm"])

    @property
    def batch_size(self) -> int:
        return int(self.data["batch_size"])

    @property
    def seed(self) -> int:
        return int(self.data["seed"])

    @property
    def run_id(self) -> str | None:
        value = self.data.get("run_id")
        return None if value is None else str(value)

    @property
    def name(self) -> str:
        return str(self.data.get("run_name") or self.path.parent.name)

    @property
    def error(self) -> str | None:
        value = self.data.get("error")
        return None if value in (None, "") else str(value)

    @property
    def is_bn_family(self) -> bool:
        """Its layers keep running statistics (the record says so; older records: it has eval modes)."""
        return self.data.get("bn_family") is True or bool(self.eval_modes)

    @property
    def eval_modes(self) -> dict[str, float]:
        """Finite eval-mode scores ({} for norms without running statistics)."""
        modes = self.data.get("eval_modes") or {}
        if not isinstance(modes, dict):
            return {}
        return {str(k): v for k, v in ((k, _finite(v)) for k, v in modes.items()) if v is not None}

    @property
    def eval_modes_hd95(self) -> dict[str, float]:
        modes = self.data.get("eval_modes_hd95") or {}
        if not isinstance(modes, dict):
            return {}
        return {str(k): v for k, v in ((k, _finite(v)) for k, v in modes.items()) if v is not None}

    def condition(self, fields: Iterable[str]) -> str:
        """'intensity=none, budget_unit=patches' for the given condition fields ('?' where not recorded)."""
        return ", ".join(f"{f}={self.data.get(f, '?')}" for f in fields)

    @property
    def still_improving(self) -> bool | None:
        """The run's convergence flag: its convergence metric still improved at the end (None: not recorded)."""
        convergence = self.data.get("convergence")
        flag = convergence.get("still_improving") if isinstance(convergence, dict) else None
        return flag if isinstance(flag, bool) else None

    @property
    def convergence_metric(self) -> str | None:
        """What the convergence flag was computed on (val_dice, train_loss, val_dice_batch); None: not said."""
        convergence = self.data.get("convergence")
        metric = convergence.get("metric") if isinstance(convergence, dict) else None
        return None if metric is None else str(metric)

    @property
    def batch_dependent(self) -> bool:
        """Its training-mode output depends on the other samples of the batch (older records: BN family)."""
        flag = self.data.get("batch_dependent")
        return flag if isinstance(flag, bool) else self.is_bn_family

    @property
    def accumulate_steps(self) -> int:
        """Micro-batches per optimizer step (gradient accumulation); 1 where not recorded."""
        value = self.data.get("accumulate_steps")
        return int(value) if _is_integral(value) and value > 1 else 1

    def case_scores(self, mode: str, measure: str) -> dict[str, float] | None:
        """Per validation case: the mean of `measure` ("dice" or "hd95") over the case's present classes, in
        evaluation `mode`. None when the record has no per-case scores for that mode; a case whose classes are
        all null (absent from the case) has no score and is left out."""
        per_case = self.data.get("per_case")
        cases = per_case.get(mode) if isinstance(per_case, dict) else None
        if not isinstance(cases, dict):
            return None
        scores = {}
        for case, measures in cases.items():
            by_class = measures.get(measure) if isinstance(measures, dict) else None
            present = [v for v in (by_class or {}).values() if _finite(v) is not None]
            if present:
                scores[str(case)] = math.fsum(present) / len(present)
        return scores

    def case_errors(self, mode: str) -> dict[str, dict[str, float]]:
        """Per validation case: the error locations of evaluation `mode` (training/error_locations.py FIELDS,
        finite numbers only); {} when the record has none."""
        per_case = self.data.get("per_case")
        cases = per_case.get(mode) if isinstance(per_case, dict) else None
        found: dict[str, dict[str, float]] = {}
        for case, measures in (cases or {}).items() if isinstance(cases, dict) else ():
            record = measures.get("errors") if isinstance(measures, dict) else None
            if isinstance(record, dict):
                values = {str(k): v for k, v in ((k, _finite(v)) for k, v in record.items()) if v is not None}
                found[str(case)] = values
        return found

    @property
    def case_names(self) -> frozenset[str]:
        """The validation cases the record has per-case scores for, in any evaluation mode."""
        per_case = self.data.get("per_case")
        modes = per_case.values() if isinstance(per_case, dict) else ()
        return frozenset(str(case) for cases in modes if isinstance(cases, dict) for case in cases)

    def value(self, key: str) -> float | None:
        """A top-level numeric field as a finite float, or None if absent, null, NaN or not a number."""
        return _finite(self.data.get(key))


@dataclass
class Collection:
    """Everything found below the sweep directories."""

    sweep_dirs: list[Path]
    runs: list[Run]  # after removing superseded duplicates
    unreadable: list[tuple[Path, str]] = field(default_factory=list)  # (file, why)
    warnings: list[str] = field(default_factory=list)  # duplicates and other notes for the reader


def _finite(value: Any) -> float | None:
    # bool is an int subclass; a True Dice would be a schema bug, not a 1.0.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _is_integral(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _holder_gone(run_dir: Path) -> str | None:
    """The run folder's lock holder ('process N on HOST') when it is a process of this machine that has ended:
    the operating system released its lock, so it is not training. None when the lock names another machine,
    is unreadable, or its process exists (a reused PID errs towards 'running'). Reads the file, never locks it:
    a report must not make a starting run find its folder busy."""
    try:
        text = safe_io.read_text(run_dir / run_record.LOCK, 512).strip()
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    found = run_record.HOLDER.fullmatch(text)
    if found is None or found.group(2) != socket.gethostname():
        return None
    try:
        os.kill(int(found.group(1)), 0)
    except ProcessLookupError:
        return text
    except (OSError, OverflowError):  # PermissionError: it exists, as another user's
        return None
    return None


def find_metrics_files(sweep_dir: Path) -> list[Path]:
    """All metrics.json files at any depth below sweep_dir (symlinked folders are not followed)."""
    found = []
    for root, _dirs, files in os.walk(sweep_dir):
        if run_record.FILENAME in files:
            found.append(Path(root) / run_record.FILENAME)
    return sorted(found)


def read_run(path: Path) -> Run:
    """Read one metrics.json and check it against the report's schema (schema.py). Raises ValueError with a
    short reason naming the field if it is unusable: the file is then left out of the analysis as a whole."""
    if path.is_symlink():  # a run's record lies in its own folder; a link may point at any file
        raise ValueError(f"a symbolic link (to {os.readlink(path)}), not a run's own record")
    try:  # bounded: a FIFO, a device or a huge or deeply nested file is refused, not read
        data = safe_io.load_json(path)
        mtime = path.stat().st_mtime
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON ({err.msg} at line {err.lineno} column {err.colno})") from err
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"cannot read: {err}") from err
    found = schema.problem(data)
    if found:
        raise ValueError(found)
    return Run(path=path, mtime=mtime, data=data)


def case_set_notes(runs: list[Run]) -> list[str]:
    """One note per condition whose completed runs scored different validation cases: its comparisons use
    only the cases both sides' seeds all scored (model.paired), a t-test over seeds where fewer than 2."""
    by_condition: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        if run.completed and run.case_names:
            by_condition[run.condition(CONDITION_FIELDS)].append(run)
    notes = []
    for condition, group in sorted(by_condition.items()):
        sets = {run.case_names for run in group}
        if len(sets) < 2:
            continue
        common = frozenset.intersection(*sets)
        where = f"{condition}: " if len(by_condition) > 1 else ""
        notes.append(
            f"{where}the completed runs scored different validation cases ({len(sets)} different sets of cases "
            f"among {len(group)} runs, {len(common)} case(s) scored by all of them): a comparison uses only "
            "the cases every seed of both sides scored, and is a t-test over seeds (§) where fewer than 2 are "
            "shared"
        )
    return notes


def _newest_first(runs: Iterable[Run]) -> list[Run]:
    # A completed run beats any unfinished one; among equals the most recently written file wins.
    return sorted(runs, key=lambda r: (r.completed, r.mtime, str(r.path)), reverse=True)


def _dedupe_by_run_id(runs: list[Run]) -> tuple[list[Run], list[str]]:
    """Keep the newest completed run per run_id (a re-run of the same config), else the newest run."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        groups[run.run_id or f"path:{run.path}"].append(run)
    kept, notes = [], []
    for run_id, group in groups.items():
        ordered = _newest_first(group)
        kept.append(ordered[0])
        if len(group) > 1:
            dropped = ", ".join(str(r.path) for r in ordered[1:])
            notes.append(
                f"run_id {run_id} appears {len(group)} times; kept {ordered[0].path} "
                f"({ordered[0].status}), ignored {dropped}"
            )
    return kept, notes


def collect(sweep_dirs: Iterable[Path]) -> Collection:
    """Read every run below the sweep dirs. Raises UserError if a dir is missing or no metrics.json below
    them can be read."""
    sweep_dirs = [Path(d) for d in sweep_dirs]
    if not sweep_dirs:
        raise UserError("no sweep dir given")
    for sweep_dir in sweep_dirs:
        if not sweep_dir.is_dir():
            raise UserError(f"sweep dir not found: {sweep_dir}")

    # Overlapping arguments (a sweep dir and one of its subfolders) must not count a run twice.
    files = sorted({p.resolve(): p for d in sweep_dirs for p in find_metrics_files(d)}.values())
    if not files:
        raise UserError(f"no {run_record.FILENAME} found under {', '.join(str(d) for d in sweep_dirs)}")

    runs, unreadable = [], []
    for path in files:
        try:
            runs.append(read_run(path))
        except ValueError as err:
            unreadable.append((path, str(err)))
    if not runs:  # an empty report would look like a sweep with no results
        shown = "; ".join(f"{path} ({why})" for path, why in unreadable[:3])
        more = f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else ""
        raise UserError(f"no readable {run_record.FILENAME}: {shown}{more}")
    kept, notes = _dedupe_by_run_id(runs)
    kept.sort(key=lambda r: (r.norm, r.batch_size, r.seed, str(r.path)))
    notes += case_set_notes(kept)
    return Collection(sweep_dirs=sweep_dirs, runs=kept, unreadable=unreadable, warnings=notes)
