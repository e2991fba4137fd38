"""Declared questions: the few comparisons a study is designed to decide, written before it runs.

A question compares two score series of the same runs' seeds and validation cases: side a minus side b.
A side is a row of the report (a norm, or a variant row such as ``batch [accumulate 4]``) at one batch size,
scored as model.eval() scores it (``eval: model``, running statistics for BatchNorm) or in one of BatchNorm's
other evaluation modes on the same weights (``batch``, ``precise``). A study preset writes its questions under
``hydra.sweeper.study.questions`` (configs/hydra/sweeper/study.yaml shows the format), the sweeper copies them
into the sweep folder's study.json, and the report tests them first, as one family.

    eval_gap_bs1:
      text: At batch 1, does model.eval() lose Dice against batch statistics on the same weights?
      a: {norm: batch, batch_size: 1, eval: model}
      b: {norm: batch, batch_size: 1, eval: batch}

study.json lies in a sweep folder, so it is untrusted: every field is checked here, and a wrong one is one
line naming it.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any

from norm_experiments.errors import UserError
from norm_experiments.report.cells import CASE_MEASURES, EVAL_MODE_LABELS, LOWER_IS_BETTER, Cell, outcome
from norm_experiments.report.model import Scores
from norm_experiments.report.verdicts import HD95_MARGIN

# model: what model.eval() scores (running statistics for BatchNorm); model_lcc: the same predictions with
# each class's largest connected component kept (post-processing); batch, precise: BatchNorm's other modes.
EVALS = ("model", "model_lcc", "batch", "precise", "batch_alone", "precise_more")
BATCHNORM_EVALS = EVALS[2:]  # the modes only a norm with running statistics has
RECORD_MODES = {"model": "running", "model_lcc": "running_lcc", **{e: e for e in EVALS[2:]}}
METRICS = tuple(CASE_MEASURES)  # metrics with per-case scores: val_dice, val_hd95
MAX_QUESTIONS = 20
MAX_TEXT = 300
_SIDE_KEYS = ("norm", "batch_size", "eval")
EVAL_LABELS = {**EVAL_MODE_LABELS, "model_lcc": "largest component"}
_QUESTION_KEYS = ("text", "a", "b", "metric", "margin")


@dataclass(frozen=True)
class Side:
    """One score series: a report row at one batch size, in one evaluation mode."""

    row: str
    batch_size: int
    eval: str = "model"

    @property
    def mode(self) -> str:
        """The record's evaluation mode (per_case key)."""
        return RECORD_MODES[self.eval]

    def label(self) -> str:
        what = self.row if self.eval == "model" else f"{self.row} ({EVAL_LABELS[self.eval]})"
        return f"{what}, bs {self.batch_size}"

    def as_dict(self) -> dict[str, Any]:
        return {"norm": self.row, "batch_size": self.batch_size, "eval": self.eval}


@dataclass(frozen=True)
class Question:
    """a - b, decided as better / worse / equivalent within ±margin."""

    name: str
    text: str
    a: Side
    b: Side
    metric: str
    margin: float

    @property
    def lower_is_better(self) -> bool:
        return self.metric in LOWER_IS_BETTER

    def as_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "a": self.a.as_dict(),
            "b": self.b.as_dict(),
            "metric": self.metric,
            "margin": self.margin,
        }


def _unknown(key: str, valid: tuple[str, ...], where: str) -> UserError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return UserError(f"{where}: unknown key '{key}'{hint} valid: {', '.join(valid)}")


def _side(raw: Any, where: str) -> Side:
    if not isinstance(raw, dict):
        raise UserError(f"{where}: must be a mapping with norm, batch_size and eval, got {raw!r}"[:300])
    for key in raw:
        if key not in _SIDE_KEYS:
            raise _unknown(str(key), _SIDE_KEYS, where)
    row, batch_size, how = raw.get("norm"), raw.get("batch_size"), raw.get("eval", "model")
    if not isinstance(row, str) or not row or len(row) > 200:
        raise UserError(f"{where}.norm: must be a norm (a report row such as 'batch'), got {row!r}"[:300])
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= 10**6:
        raise UserError(f"{where}.batch_size: must be a positive integer, got {batch_size!r}"[:300])
    if how == "running":  # the same scores as model.eval() for a BatchNorm-family norm
        how = "model"
    if how not in EVALS:
        close = difflib.get_close_matches(str(how), EVALS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"{where}.eval: must be one of {', '.join(EVALS)}, got {how!r}{hint}"[:300])
    return Side(row, batch_size, how)


def parse_question(name: Any, raw: Any, default_margin: float, where: str) -> Question:
    """One question from its plain mapping; UserError naming the key that is wrong."""
    here = f"{where}.{name}"
    if not isinstance(name, str) or not name.replace("_", "").isalnum() or len(name) > 60:
        raise UserError(f"{where}: question names are letters, digits and _ (at most 60), got {name!r}"[:300])
    if not isinstance(raw, dict):
        raise UserError(f"{here}: must be a mapping with text, a and b")
    for key in raw:
        if key not in _QUESTION_KEYS:
            raise _unknown(str(key), _QUESTION_KEYS, here)
    text = raw.get("text", "")
    if not isinstance(text, str) or len(text) > MAX_TEXT:
        raise UserError(f"{here}.text: must be a sentence of at most {MAX_TEXT} characters")
    metric = raw.get("metric", "val_dice")
    if metric not in METRICS:
        raise UserError(f"{here}.metric: must be one of {', '.join(METRICS)}, got {metric!r}"[:300])
    # The study's margin is the Dice default; an HD95 question without one takes the report's, in mm.
    margin = raw.get("margin", default_margin if metric == "val_dice" else HD95_MARGIN)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 < margin < math.inf:
        raise UserError(f"{here}.margin: must be a positive number, got {margin!r}"[:300])
    a, b = _side(raw.get("a"), f"{here}.a"), _side(raw.get("b"), f"{here}.b")
    if a == b:
        raise UserError(f"{here}: a and b are the same series ({a.label()})")
    return Question(name, text or f"{a.label()} minus {b.label()}", a, b, metric, float(margin))


def parse_questions(raw: Any, default_margin: float, where: str) -> list[Question]:
    """The questions of a mapping {name: question}; UserError for an empty or malformed one."""
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{where}: must be a mapping of at least one question (name: {{text, a, b}})")
    if len(raw) > MAX_QUESTIONS:
        raise UserError(f"{where}: {len(raw)} questions; at most {MAX_QUESTIONS} (each one costs power)")
    return [parse_question(name, value, default_margin, where) for name, value in raw.items()]


def side_scores(cell: Cell | None, side: Side, metric: str) -> Scores:
    """Per seed and per case: what the side's completed runs scored (empty when the cell is missing). The
    per-seed value is the record's own (val_dice, eval_modes...) where it has one, else the mean over cases."""
    found = Scores()
    if cell is None:
        return found
    measure = CASE_MEASURES[metric]
    for run in cell.runs:
        if outcome(run, "val_dice")[0] != "completed":
            continue
        cases = run.case_scores(side.mode, measure)
        if side.eval == "model":
            value = run.value(metric)
        elif side.eval == "model_lcc":
            value = sum(cases.values()) / len(cases) if cases else None
        else:
            modes = run.eval_modes if metric == "val_dice" else run.eval_modes_hd95
            value = modes.get(side.mode)
        if value is None:
            continue
        found.by_seed[run.seed] = value
        if cases is not None:
            found.by_case[run.seed] = cases
    return found


def only_seeds(scores: Scores, seeds: set[int]) -> Scores:
    """The scores of the given seeds only (a look sees the seeds run up to it)."""
    return Scores(
        by_seed={s: v for s, v in scores.by_seed.items() if s in seeds},
        by_case={s: v for s, v in scores.by_case.items() if s in seeds},
    )
