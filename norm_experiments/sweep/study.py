"""The study sweeper: the sweep's grid, run seed round by seed round until every declared question is decided.

`hydra/sweeper=study` (configs/hydra/sweeper/study.yaml) takes the grid from `hydra.sweeper.params` as
Hydra's basic sweeper does, but not the seeds: `hydra.sweeper.study.looks` lists the seeds at each look
(e.g. [6, 10, 14]). It runs seeds 0 .. n_1 - 1 of every cell, answers the declared questions from the
records (report/primary.py, the same code the report uses), and goes on to the next look only while a
question is open, the looks are not used up and the wall-time cap allows another round
(report/sequential.py says why the error rates hold). The design is written to the sweep folder's study.json
before the first run, so the report tests exactly what was declared.

Running the same command again resumes: the runs already finished are skipped by the training code, and
the looks are answered again from the same records, so the sweep stops where it would have.

The report's modules are imported when a sweep starts, not with this module: Hydra imports every sweeper
plugin whenever any of our commands starts, and the report brings matplotlib.
"""

from __future__ import annotations

import difflib
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from norm_experiments.errors import USER_ERROR_EXIT, UserError
from norm_experiments.sweep import progress

if TYPE_CHECKING:
    from norm_experiments.report.sequential import Design

log = logging.getLogger("norm_experiments.sweep")


def _value(combo: list[str], key: str, default: Any) -> str:
    found = [o.split("=", 1)[1] for o in combo if o.split("=", 1)[0].lstrip("+~") == key]
    return found[-1] if found else str(default)


def cell_of(combo: list[str], config: Any) -> tuple[str, str]:
    """(norm, batch size) a job of the grid trains, from its overrides or the config's defaults."""
    return _value(combo, "norm", config.norm.name), _value(combo, "data.batch_size", config.data.batch_size)


def question_cells(questions: Any) -> list[tuple[str, str]]:
    """The (norm, batch size) cells the questions compare, in the order they are named."""
    cells: dict[tuple[str, str], None] = {}
    for q in questions:
        for side in (q.a, q.b):
            cells[(side.row, str(side.batch_size))] = None
    return list(cells)


def make_grid(design: Design, overrides: list, combos: list[list[str]]) -> list[list[str]]:
    """The jobs of one seed: the params' grid, or, when neither norm nor data.batch_size is swept or set,
    the cells the questions compare (each with every combination of the other sweeps)."""
    keys = {o.get_key_element().lstrip("+~") for o in overrides}
    if keys & {"norm", "data.batch_size"}:
        return combos
    cells = question_cells(design.questions)
    if any(" " in norm for norm, _ in cells):
        raise UserError(
            "hydra.sweeper.params: a question names a variant row; list the grid's norm and "
            "data.batch_size in hydra.sweeper.params"
        )
    return [[f"norm={norm}", f"data.batch_size={bs}", *combo] for norm, bs in cells for combo in combos]


def check_grid(design: Design, grid: list[list[str]], config: Any, in_params: set[str] = frozenset()) -> None:
    """Every question's sides must be cells the grid runs (a plain norm name and a batch size). `in_params`:
    the grid keys hydra.sweeper.params sets (the fix is there), not the command line (training one cell)."""
    cells = {cell_of(combo, config) for combo in grid}
    norms, sizes = {n for n, _ in cells}, {b for _, b in cells}
    if in_params & {"norm", "data.batch_size"}:
        alone = (
            "; add it to hydra.sweeper.params, or leave norm and data.batch_size out of params (the sweep then "
            "runs the cells the questions compare)"
        )
    else:
        alone = "; to train one cell of this study alone, add hydra.mode=RUN"
    for q in design.questions:
        for name, side in (("a", q.a), ("b", q.b)):
            where = f"hydra.sweeper.study.questions.{q.name}.{name}"
            if " " in side.row:
                continue  # a variant row: its runs differ in a setting the grid's overrides carry
            if side.row not in norms:
                raise UserError(
                    f"{where}.norm={side.row}: the sweep runs norm {', '.join(sorted(norms))}{alone}"
                )
            if (side.row, str(side.batch_size)) not in cells:
                shown = sorted(sizes, key=lambda v: (len(v), v))
                raise UserError(
                    f"{where}.batch_size={side.batch_size}: the sweep runs {side.row} at data.batch_size "
                    f"{', '.join(b for b in shown if (side.row, b) in cells)}{alone}"
                )


def still_needed(grid: list[list[str]], design: Design, primaries: list, config: Any) -> list[list[str]]:
    """The jobs of the next look: a cell only decided questions compare has its answer and is not run again;
    cells no question compares (exploratory) and cells of open questions are."""
    if not primaries:
        return grid
    asked = set(question_cells(design.questions))
    open_cells = set(question_cells([a.question for p in primaries for a in p.answers if not a.decided]))
    return [c for c in grid if cell_of(c, config) not in asked or cell_of(c, config) in open_cells]


def plan_study(
    study: Any, params: dict | None, arguments: list[str], config: Any, config_loader: Any = None
) -> tuple[Design, list[list[str]]]:
    """The declared design and the grid of one seed, checked (UserError naming the key): the sweeper's plan,
    and the command line's check before Hydra creates the sweep folder (command_line.py), so that a refused
    study leaves a finished sweep's files as they were."""
    from norm_experiments.report.sequential import parse_design

    raw = OmegaConf.to_container(study, resolve=True) if OmegaConf.is_config(study) else study
    design = parse_design(raw, "hydra.sweeper.study")
    in_params = {str(k).lstrip("+~") for k in (params or {})}
    params = [f"{k}={v}" for k, v in (params or {}).items()] + list(arguments)
    overrides = OverridesParser.create(config_loader=config_loader).parse_overrides(params)
    if any(o.get_key_element().lstrip("+~") == "seed" for o in overrides):
        raise UserError(
            "seed: the study sweeper runs the seeds itself (hydra.sweeper.study.looks, seeds 0 .. n-1); "
            "remove seed= from the command line and from hydra.sweeper.params"
        )
    if config_loader is not None:
        check_sides(design, config_loader.get_group_options("norm"))
    grid = make_grid(design, overrides, BasicSweeper.split_arguments(overrides, None)[0])
    check_grid(design, grid, config, in_params)
    check_modes_scored(design, config)
    return design, grid


# The trainer switch a run needs to score each evaluation mode a question may ask for.
MODE_SWITCHES = {
    "batch": "trainer.eval_modes",
    "precise": "trainer.eval_modes",
    "batch_alone": "trainer.remedy_modes",
    "precise_more": "trainer.remedy_modes",
}


def check_modes_scored(design: Design, config: Any) -> None:
    """Every evaluation mode a question asks for is one the runs score: eval=precise_more without
    trainer.remedy_modes=true ran the study to its seed cap with that question "untestable"."""
    for q in design.questions:
        for name, side in (("a", q.a), ("b", q.b)):
            switch = MODE_SWITCHES.get(side.eval)
            if (
                switch is not None
                and config is not None
                and not OmegaConf.select(config, switch, default=False)
            ):
                raise UserError(
                    f"hydra.sweeper.study.questions.{q.name}.{name}.eval={side.eval}: the runs score it only "
                    f"with {switch}=true (it is false here)"
                )
            if side.eval == "batch_alone" and config is not None and _batch_windows(config) == 1:
                raise UserError(
                    f"hydra.sweeper.study.questions.{q.name}.{name}.eval=batch_alone: with one window per "
                    "forward (trainer.batch_stats_windows=1) eval=batch already is each window alone, and the "
                    "runs do not score batch_alone apart: ask for eval=batch"
                )


def _batch_windows(config: Any) -> int | None:
    """Windows per forward in the runs' eval=batch (training/evaluate.py: batch_stats_windows, else
    sw_batch_size); batch_alone is scored only when that is more than one."""
    windows = OmegaConf.select(config, "trainer.batch_stats_windows", default=None)
    windows = windows or OmegaConf.select(config, "trainer.sw_batch_size", default=None)
    return int(windows) if isinstance(windows, int) else None


def check_sides(design: Design, norm_options: list[str]) -> None:
    """Each question's side names a norm option (configs/norm/, or the user's config folder), and asks for one
    of BatchNorm's evaluation modes only of a norm that has them: a side no run can score made the study run to
    its end with that question "untestable", its share of alpha spent for nothing."""
    from norm_experiments.norms import registry
    from norm_experiments.report.questions import BATCHNORM_EVALS

    for q in design.questions:
        for name, side in (("a", q.a), ("b", q.b)):
            where = f"hydra.sweeper.study.questions.{q.name}.{name}"
            if " " in side.row:
                continue  # a variant row (check_grid)
            if side.row not in norm_options:
                close = difflib.get_close_matches(side.row, norm_options, n=2, cutoff=0.5)
                hint = f"did you mean {' or '.join(close)}? " if close else ""
                raise UserError(
                    f"{where}.norm={side.row}: no such norm; {hint}The options: {', '.join(norm_options)}"
                )
            known = side.row in registry.names()
            if side.eval in BATCHNORM_EVALS and known and not registry.get(side.row).bn_family:
                raise UserError(
                    f"{where}.eval={side.eval}: {side.row} keeps no running statistics, so it has only "
                    "eval=model (as model.eval() scores it) or model_lcc; the others are BatchNorm's"
                )


def design_change_problem(sweep_dir: Path, design: Design) -> str | None:
    """Why this design may not run in sweep_dir, or None: its study.json declares another design and runs were
    made under it. Questions, looks, alpha and margins are fixed before the first run: changed after seeing
    results (a wider margin turning "inconclusive" into "equivalent") they would void the error rates the
    design promises. The wall-time cap is not part of that promise and may change on a resume."""
    from norm_experiments.report.primary import read_study
    from norm_experiments.run_record import FILENAME

    try:
        before = read_study([sweep_dir])
    except UserError:  # an unreadable design: the report names it; nothing here to compare with
        return None
    if before is None or not any(sweep_dir.rglob(FILENAME)):
        return None
    old, new = before.design.as_dict(), design.as_dict()
    changed = [key for key in old if key != "max_minutes" and old[key] != new[key]]
    if not changed:
        return None
    said = ", ".join(
        "the questions" if key == "questions" else f"{key} {old[key]} -> {new[key]}" for key in changed
    )
    return (
        f"hydra.sweep.dir={sweep_dir}: its runs were made under the design in {before.path}, and this command "
        f"changes {said}; a study's design is fixed before its first run (changed after seeing results, it "
        "would void the error rates): run the new design in a new folder (name=NEW, or hydra.sweep.dir=NEW where "
        "the command sets the folder)"
    )


def earlier_spending(sweep_dir: Path) -> tuple[float, float]:
    """(minutes, seconds per trained run) the sweep's earlier invocations spent, from its study.json; (0, 0)
    for a new sweep, or one with no finished runs yet."""
    from norm_experiments.report.primary import read_study
    from norm_experiments.run_record import FILENAME

    try:
        before = read_study([sweep_dir])
    except UserError:  # unreadable: this invocation writes a new one
        return 0.0, 0.0
    if before is None or not any(sweep_dir.rglob(FILENAME)):
        return 0.0, 0.0
    return before.minutes or 0.0, before.seconds_per_run or 0.0


class StudySweeper(BasicSweeper):
    """Hydra sweeper: the grid of `params`, seeds added look by look (see the module doc)."""

    def __init__(
        self, max_batch_size: int | None = None, params: dict | None = None, study: Any = None
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.study = study
        self._seconds_per_job = 0.0

    def sweep(self, arguments: list[str]) -> Any:
        try:
            design, combos = self._prepare(arguments)
            # as the command line's check does before Hydra starts (a preset from --config-dir is Hydra's)
            problem = design_change_problem(Path(self.config.hydra.sweep.dir), design)
            if problem:
                raise UserError(problem)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(USER_ERROR_EXIT)
        from norm_experiments.report.primary import batch_size_notes

        for note in batch_size_notes(design.questions):
            log.warning("hydra.sweeper.study.questions.%s", note)
        return self._run_looks(design, combos)

    def _prepare(self, arguments: list[str]) -> tuple[Design, list[list[str]]]:
        assert self.config is not None and self.hydra_context is not None
        return plan_study(self.study, self.params, arguments, self.config, self.hydra_context.config_loader)

    def _run_looks(self, design: Design, grid: list[list[str]]) -> list:
        assert self.config is not None and self.launcher is not None
        from norm_experiments.sweep.callback import write_multirun_yaml

        # Only now, with the design and grid checked: a refused study leaves a finished one's files as they were.
        sweep_dir = Path(self.config.hydra.sweep.dir)
        write_multirun_yaml(self.config)
        progress.start(sweep_dir, None)
        # The time cap is the sweep's, not the command's: a rerun (after a crash, or after the cap stopped it)
        # counts the minutes its earlier invocations spent, and starts from their pace.
        spent, self._seconds_per_job = earlier_spending(sweep_dir)
        started = time.monotonic()

        def minutes_now() -> float:
            return spent + (time.monotonic() - started) / 60

        self._write(sweep_dir, design, None, round(spent, 2))
        try:
            returns, stopped = self._take_looks(design, grid, sweep_dir, minutes_now, spent)
        except BaseException:  # Ctrl-C, a launcher's failure: keep the minutes this command spent
            self._write(sweep_dir, design, None, round(minutes_now(), 2), self._seconds_per_job)
            raise
        self._write(sweep_dir, design, stopped, round(minutes_now(), 2), self._seconds_per_job)
        log.info("study stopped: %s", stopped)
        return returns

    def _take_looks(
        self,
        design: Design,
        grid: list[list[str]],
        sweep_dir: Path,
        minutes_now: Callable[[], float],
        spent: float,
    ) -> tuple[list, str]:
        """The looks, until every question is decided, the last look or the time cap; (returns, why it stopped)."""
        from norm_experiments.report.primary import STOP_DECIDED, STOP_LAST_LOOK, STOP_TIME

        assert self.launcher is not None
        returns, job_index, done, stopped = [], 0, 0, STOP_LAST_LOOK
        combos = grid
        for k, seeds in enumerate(design.looks):
            jobs = len(combos) * (seeds - done)
            if (
                k
                and design.max_minutes is not None
                and self._over_time(design, k, jobs, minutes_now(), spent)
            ):
                stopped = STOP_TIME
                break
            batch = [[*combo, f"seed={s}"] for s in range(done, seeds) for combo in combos]
            look_started, trained_before = time.monotonic(), progress.trained_runs(sweep_dir)
            log.info(
                "look %d of %d: seeds %d-%d of %d cells (%d runs)",
                k + 1, len(design.looks), done, seeds - 1, len(combos), len(batch),
            )  # fmt: skip
            self.validate_batch_is_legal(batch)
            progress.add_runs(sweep_dir, len(batch))
            returns.append(self.launcher.launch(batch, initial_job_idx=job_index))
            job_index, done = job_index + len(batch), seeds
            trained = progress.trained_runs(sweep_dir) - trained_before
            if trained:  # a look whose runs were all finished before (a rerun) says nothing of the pace
                self._seconds_per_job = (time.monotonic() - look_started) / trained
            self._write(sweep_dir, design, None, round(minutes_now(), 2), self._seconds_per_job)
            primaries = self._answer(sweep_dir, design, k)
            if primaries and all(p.all_decided for p in primaries):
                stopped = STOP_DECIDED
                break
            combos = still_needed(grid, design, primaries, self.config)
        return returns, stopped

    @staticmethod
    def _write(
        sweep_dir: Path, design: Design, stopped: str | None, minutes: float, seconds_per_run: float = 0.0
    ) -> None:
        """study.json after every look (a crash keeps the minutes spent), and before the first run: a resumed
        study's own design, or one whose time cap changed (a changed design over finished runs was refused in
        `sweep`: design_change_problem)."""
        from norm_experiments.report.primary import write_study

        try:
            write_study(sweep_dir, design, stopped, minutes, round(seconds_per_run, 2) or None)
        except OSError as err:  # a full disk, a read-only folder: one line, not Hydra's traceback
            print(f"error: cannot write {sweep_dir / 'study.json'}: {err.strerror or err}", file=sys.stderr)
            sys.exit(USER_ERROR_EXIT)

    def _over_time(self, design: Design, k: int, jobs: int, minutes: float, earlier: float) -> bool:
        """Would look k end after the cap? (its jobs at the pace of the last look that trained runs)"""
        next_minutes = self._seconds_per_job * jobs / 60
        if minutes + next_minutes <= design.max_minutes:  # type: ignore[operator]
            return False
        before = f", {earlier:.1f} of them before this command" if earlier else ""
        log.info(
            "time cap: look %d would end at about %.1f min of sweep%s, after the cap of %g min; the same "
            "command with a larger hydra.sweeper.study.max_minutes takes it",
            k + 1, minutes + next_minutes, before, design.max_minutes,
        )  # fmt: skip
        return True

    def _answer(self, sweep_dir: Path, design: Design, taken: int) -> list:
        """The declared questions at the looks taken so far (the last one `taken`), printed one line each: as
        they stood at that look, also on a rerun whose folder already holds the runs of later looks."""
        from norm_experiments.report.analysis import analyze
        from norm_experiments.report.collect import collect
        from norm_experiments.report.sequential import Answer

        try:
            analysis = analyze(collect([sweep_dir]), design=design)
        except UserError as err:
            log.error("study: cannot answer the questions yet: %s", err)
            return []
        for primary in analysis.primary:
            for found in primary.answers:
                so_far = Answer(found.question, [look for look in found.looks if look.k <= taken])
                look = so_far.final
                state = "open" if not so_far.decided else f"decided at look {look.k + 1}"
                interval = look.interval if look else None
                shown = (
                    f"{look.estimate.mean:+.3f} [{interval[0]:+.3f}, {interval[1]:+.3f}]" if interval else "-"
                )
                log.info(
                    "  %s: %s %s (%s)", found.question.name, look.verdict.value if look else "-", shown, state
                )
        return analysis.primary
