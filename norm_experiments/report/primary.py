"""The declared questions of a study, answered from its runs: one family, tested first, look by look.

The design (questions, looks, alpha spending) comes from the sweep folder's study.json, which the study
sweeper writes before the first run (sweep/study.py). Verdicts are recomputed here from the runs' records,
never copied from the file, so the report and the sweeper that decided when to stop always agree.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from norm_experiments import safe_io
from norm_experiments.errors import UserError
from norm_experiments.report.cells import Cell
from norm_experiments.report.power import POWER, decide_probability, detectable_difference, power_two_sided
from norm_experiments.report.questions import Question, Side, side_scores
from norm_experiments.report.sequential import (
    Answer,
    Design,
    answer,
    looks_available,
    parse_design,
    projected,
    seeds_to_decide,
)

STUDY_FILE = "study.json"
# Why a study sweep stopped (the study sweeper writes one of these into study.json).
STOP_DECIDED = "every question decided"
STOP_LAST_LOOK = "seed cap: the last look was taken"
STOP_TIME = "time cap"
STOPS = (STOP_DECIDED, STOP_LAST_LOOK, STOP_TIME)
FINISHED = ("completed", "failed", "diverged")  # a run with one of these statuses will not change any more
GAP = 0.05  # the difference every power line is also stated for (Dice)


@dataclass
class StudyFile:
    """study.json: the design, and what the sweeper did (looks taken, why it stopped)."""

    path: Path
    design: Design
    stopped: str | None = None  # one of STOPS; None: still running, interrupted, or not said
    minutes: float | None = None  # wall time of the sweep so far, every invocation of its command together
    seconds_per_run: float | None = None  # the last look's pace: wall seconds per run it trained


def read_study(sweep_dirs: list[Path]) -> StudyFile | None:
    """The design of the first sweep dir that has a study.json; UserError if one is malformed or two differ."""
    found: StudyFile | None = None
    for sweep_dir in sweep_dirs:
        path = Path(sweep_dir) / STUDY_FILE
        if not path.exists():
            continue
        try:
            raw = safe_io.load_json(path, max_bytes=2**20)
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise UserError(f"{path}: cannot read the study design: {err}") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path}: not a JSON object")
        design = parse_design(raw.get("design"), f"{path}: design")
        stopped = raw.get("stopped")
        study = StudyFile(
            path,
            design,
            stopped if stopped in STOPS else None,  # a file's own words never reach the document
            _duration(raw.get("minutes")),
            _duration(raw.get("seconds_per_run")),
        )
        if found is not None and found.design != design:
            raise UserError(f"{found.path} and {path} declare different studies: report them separately")
        found = found or study
    return found


def _duration(value: object) -> float | None:
    """A time read from study.json: a finite, non-negative number, else None (not known)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None


def write_study(
    sweep_dir: Path,
    design: Design,
    stopped: str | None,
    minutes: float | None,
    seconds_per_run: float | None = None,
) -> None:
    """Write study.json atomically (a crash leaves the previous file, never half of one)."""
    body = {
        "design": design.as_dict(),
        "stopped": stopped,
        "minutes": minutes,
        "seconds_per_run": seconds_per_run,
    }
    path = Path(sweep_dir) / STUDY_FILE
    tmp = path.with_name(f".{STUDY_FILE}.tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


@dataclass
class Primary:
    """The declared questions in one condition of the sweep."""

    design: Design
    condition: str
    answers: list[Answer]
    n_looks: int  # looks taken: the most any question's finished seeds allow
    stopped: str | None = None
    minutes: float | None = None  # the sweep's wall time, every invocation of its command (study.json)
    notes: list[str] = field(default_factory=list)

    @property
    def all_decided(self) -> bool:
        return all(a.decided for a in self.answers)


def finished_seeds(cells: list[Cell | None]) -> set[int]:
    """Seeds whose run has finished (completed, failed or diverged) in every one of these cells."""
    per_cell = []
    for cell in cells:
        if cell is None:
            return set()
        per_cell.append({r.seed for r in cell.runs if r.status in FINISHED})
    return set.intersection(*per_cell) if per_cell else set()


def batch_size_notes(questions: list[Question]) -> list[str]:
    """A question across batch sizes reads more than the batch: the budget (trainer.samples patches, or
    trainer.steps steps) gives its two sides different numbers of optimizer steps or of patches, and
    optim.lr_scaling different learning rates. Said where the study starts and in the report."""
    return [
        f"{q.name} compares batch size {q.a.batch_size} with {q.b.batch_size}: the two sides train to the same "
        "budget with different numbers of optimizer steps (or patches) and learning rates, so its verdict "
        "reads those with the batch size"
        for q in questions
        if q.a.batch_size != q.b.batch_size
    ]


def answer_all(design: Design, cells: dict[tuple[str, int], Cell], condition: str = "") -> Primary:
    """Every declared question at the looks its own cells' finished runs allow (a decided question's cells
    are not run again, so the looks of the others go further)."""

    def cell(side: Side) -> Cell | None:
        return cells.get((side.row, side.batch_size))

    answers, notes, taken = [], [], 0
    for q in design.questions:
        notes += batch_size_notes([q])
        for side in (q.a, q.b):
            if cell(side) is None:
                notes.append(f"{q.name}: no runs of {side.label()} in this sweep")
        n_looks = looks_available(design, finished_seeds([cell(q.a), cell(q.b)]))
        taken = max(taken, n_looks)
        a, b = side_scores(cell(q.a), q.a, q.metric), side_scores(cell(q.b), q.b, q.metric)
        answers.append(answer(design, q, a, b, n_looks))
    return Primary(design, condition, answers, taken, notes=notes)


def power_text(found: Answer, design: Design) -> str:
    """What the design could detect at the look that decided (or the last look), and, for an open question,
    how many seeds deciding it would take."""
    look = found.final
    if look is None:
        return f"no look yet: look 1 needs {design.looks[0]} seeds finished on both sides"
    if look.estimate is None:
        return f"untestable at look {look.k + 1}: fewer than 2 seeds scored on both sides"
    est, q = look.estimate, found.question
    detect = detectable_difference(est.se, est.df, look.level)
    unit = "" if q.metric == "val_dice" else " mm"
    text = (
        f"{100 * POWER:.0f} % for a difference of {detect:.3f}{unit} (exact noncentral t, α' = {look.level:.3g}, "
        f"SE {est.se:.4f}, df {est.df:.1f})"
    )
    if q.metric == "val_dice":  # GAP is a Dice difference (0.05 mm of HD95 would be no reference)
        at_gap = power_two_sided(GAP / est.se, est.df, look.level) if est.se > 0 else 1.0
        text += f"; a difference of {GAP}: {100 * at_gap:.0f} %"
    if found.decided:
        return text
    last = len(design.looks) - 1
    need = seeds_to_decide(est, design.level(last), q.margin)
    chance = decide_probability(est.mean, *projected(est, design.looks[last]), design.level(last), q.margin)
    if need is None:
        # Not "a larger margin": chosen after seeing the results it would void the error rates.
        more = "more than 200 seeds: the validation cases limit it (a new study with more validation cases)"
    else:
        more = f"about {need} seeds in all at the last look's level"
    return (
        f"{text}. Open: if the true difference is the one observed, deciding it with {100 * POWER:.0f} % "
        f"probability takes {more} (the design's last look, {design.looks[-1]} seeds, decides it with "
        f"{100 * chance:.0f} %)"
    )
