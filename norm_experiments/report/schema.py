"""What the report accepts from a metrics.json: every field it reads, its type and its range, checked at the door.

A run folder is untrusted (docs/safety.md): a record is checked here, by collect.read_run, before any number of
it reaches a table, a test or a plot. A record that breaks a rule is left out of the analysis as a whole, named
with the first rule it breaks (the report lists it under its unreadable files, and on standard error); a
record that passes holds only values the report's arithmetic and plots are defined for.

The rules:
- every number anywhere in the record is NaN or finite with |x| <= MAX_MAGNITUDE (Infinity, 1e308 or a
  100-digit integer would overflow a sum or a float conversion, and no record of ours holds one);
- NaN means "no value" where training writes it (a mean over no present class: val_dice, best_val_dice,
  val_hd95, the per-class and per-mode summaries, the history); it is refused where a number is required:
  the coordinates, counts, sizes, per-case entries, error locations and spacings;
- the coordinates (status, norm, batch_size, seed) are present and typed; status is one of run_record.Status;
- every other field of run_record.RunRecord is null or of its declared type, within its range: a Dice in
  [0, 1], a distance (HD95, mm), a count, a time or a memory size >= 0, a batch size >= 1;
- per_case is {mode: {case: {"dice": {class: Dice or null}, "hd95": {class: mm or null},
  "errors": {field: number >= 0}}}}; a mode may be null (no per-case scores);
- fields the record does not declare are kept (runs.csv shows them) under the number rule only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from norm_experiments import run_record

# Far above any number a record of ours holds (a step count, a memory size in MiB, a duration in seconds),
# far below where a sum over thousands of them or a float conversion overflows.
MAX_MAGNITUDE = 1e15
MAX_NAME_CHARS = 200  # a norm's name: it labels rows, plots and CSV columns

# check(value, where) -> why the value is refused (one line, naming `where`), or None.
Check = Callable[[Any, str], "str | None"]


def _shown(value: Any) -> str:
    """The value as JSON would spell it, cut to 40 characters."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def number(
    low: float = -MAX_MAGNITUDE, high: float = MAX_MAGNITUDE, nan: bool = True, what: str = ""
) -> Check:
    """A number in [low, high]; NaN allowed ("no value") only with nan=True. `what`: '(a Dice)' in messages."""
    kind = f" ({what})" if what else ""

    def check(value: Any, where: str) -> str | None:
        if not _is_number(value):
            return f"{where} is {_shown(value)}, not a number{kind}"
        if isinstance(value, float) and math.isnan(value):
            return None if nan else f"{where} is NaN where a number{kind} is required"
        if not low <= value <= high:
            return f"{where} = {_shown(value)} is outside [{low:g}, {high:g}]{kind}"
        return None

    return check


def integer(low: int = -int(MAX_MAGNITUDE)) -> Check:
    """An integer >= low (an integral float such as 2.0 counts: older records and other writers)."""

    def check(value: Any, where: str) -> str | None:
        integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not integral:
            return f"{where} is {_shown(value)}, not an integer"
        if not low <= value <= MAX_MAGNITUDE:
            return f"{where} = {_shown(value)} is outside [{low}, {MAX_MAGNITUDE:g}]"
        return None

    return check


def of_type(kind: type, name: str) -> Check:
    def check(value: Any, where: str) -> str | None:
        return None if isinstance(value, kind) else f"{where} is {_shown(value)}, not {name}"

    return check


TEXT = of_type(str, "a string")
BOOL = of_type(bool, "true or false")
LIST = of_type(list, "a list")
OBJECT = of_type(dict, "an object")


def optional(check: Check) -> Check:
    """null, or what `check` accepts."""
    return lambda value, where: None if value is None else check(value, where)


def list_of(item: Check) -> Check:
    def check(value: Any, where: str) -> str | None:
        if not isinstance(value, list):
            return f"{where} is {_shown(value)}, not a list"
        return next((p for i, v in enumerate(value) if (p := item(v, f"{where}[{i}]"))), None)

    return check


def object_of(values: Check | None = None, fields: dict[str, Check] | None = None) -> Check:
    """An object whose named `fields` pass their checks and whose other values pass `values` (if given)."""

    def check(value: Any, where: str) -> str | None:
        if not isinstance(value, dict):
            return f"{where} is {_shown(value)}, not an object"
        for key, item in value.items():
            rule = (fields or {}).get(key, values)
            problem = rule(item, f"{where}.{key}") if rule is not None else None
            if problem:
                return problem
        return None

    return check


def name(value: Any, where: str) -> str | None:
    """A norm's name: a non-empty one-line string of at most MAX_NAME_CHARS."""
    if not isinstance(value, str) or not value.strip():
        return f"{where} is {_shown(value)}, not a name"
    if len(value) > MAX_NAME_CHARS or any(ord(c) < 32 or ord(c) == 127 for c in value):
        return f"{where} = {_shown(value)} is not a one-line name of at most {MAX_NAME_CHARS} characters"
    return None


def status(value: Any, where: str) -> str | None:
    known = [s.value for s in run_record.Status]
    if value not in known:
        return f"{where} is {_shown(value)}, not one of {', '.join(known)}"
    return None


DICE = number(0.0, 1.0, what="a Dice")
DISTANCE = number(0.0, MAX_MAGNITUDE, what="a distance in mm")
AMOUNT = number(0.0, MAX_MAGNITUDE)  # a time, a memory size, a rate
FRACTION = number(0.0, 1.0, what="a fraction")
COUNT = integer(0)
SIZE = integer(1)


def _strict(check: Check) -> Check:
    """`check` with NaN refused (where a number is required)."""
    return lambda value, where: (
        f"{where} is NaN where a number is required"
        if isinstance(value, float) and math.isnan(value)
        else check(value, where)
    )


# One validation case of per_case: its scores per class (null: the class is absent from the case).
CASE = object_of(
    fields={
        "dice": optional(object_of(optional(_strict(DICE)))),
        "hd95": optional(object_of(optional(_strict(DISTANCE)))),
        "errors": optional(object_of(optional(_strict(AMOUNT)))),
    }
)
PER_CASE = object_of(optional(object_of(CASE)))

# The coordinates: every record has them (an early failure records little more).
COORDINATES: dict[str, Check] = {"status": status, "norm": name, "batch_size": SIZE, "seed": integer()}

# Every other field of run_record.RunRecord (a test checks that the two lists agree): null or this.
FIELDS: dict[str, Check] = {
    "error": TEXT,
    "run_id": TEXT,
    "run_name": TEXT,
    "norm_options": OBJECT,
    "group_layers": OBJECT,
    "batch_dependent": BOOL,
    "bn_family": BOOL,
    "model": TEXT,
    "patches_per_volume": SIZE,
    "effective_batch": SIZE,
    "accumulate_steps": SIZE,
    "world_size": SIZE,
    "global_batch": SIZE,
    "bn_batch": SIZE,
    "lr": AMOUNT,
    "lr_scaling": TEXT,
    "dataset": TEXT,
    "intensity": TEXT,
    "budget_unit": TEXT,
    "samples_budget": COUNT,
    "samples_seen": COUNT,
    "steps": COUNT,
    "total_steps": COUNT,
    "best_val_dice": DICE,
    "best_step": COUNT,
    "samples_per_s": AMOUNT,
    "data_wait_fraction": FRACTION,
    "amp": TEXT,
    "amp_skipped_steps": COUNT,
    "peak_memory_mb": AMOUNT,
    "peak_cuda_memory_mb": AMOUNT,
    "device": TEXT,
    "machine": TEXT,
    "versions": OBJECT,
    "history": LIST,
    "loss_history": LIST,
    "batch_stats_windows": SIZE,
    "preprocessing": object_of(
        fields={
            "target_spacing": optional(list_of(_strict(number(0.0, MAX_MAGNITUDE, what="a spacing in mm")))),
            "channel_intensity": optional(LIST),
        }
    ),
    "val_dice": DICE,
    "val_dice_per_class": object_of(optional(DICE)),
    "val_hd95": DISTANCE,
    "val_hd95_per_class": object_of(optional(DISTANCE)),
    "absent_classes": LIST,
    "convergence": object_of(fields={"still_improving": optional(BOOL), "metric": optional(TEXT)}),
    "eval_modes": object_of(optional(DICE)),
    "eval_modes_hd95": object_of(optional(DISTANCE)),
    "per_case": PER_CASE,
    "wall_time_s": AMOUNT,
}


def _number_problem(data: Any) -> str | None:
    """The first number anywhere in `data` that is infinite or beyond MAX_MAGNITUDE (iterative: no recursion
    limit, whatever the nesting)."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, dict):
            stack.extend((v, f"{where}.{k}" if where else str(k)) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((v, f"{where}[{i}]") for i, v in reversed(list(enumerate(value))))
        elif _is_number(value) and not (isinstance(value, float) and math.isnan(value)):
            if not -MAX_MAGNITUDE <= value <= MAX_MAGNITUDE:  # also false for ±Infinity
                return f"{where} = {_shown(value)}: no number of a record lies beyond ±{MAX_MAGNITUDE:g}"
    return None


def problem(data: Any) -> str | None:
    """Why the report must leave this record out (one line naming the first field that breaks a rule), or
    None when every field it reads is of its type and in its range."""
    if not isinstance(data, dict):
        return "not a JSON object"
    for key, check in COORDINATES.items():
        if data.get(key) is None:
            return f"missing field '{key}'"
        found = check(data[key], key)
        if found:
            return found
    for key, check in FIELDS.items():
        if data.get(key) is not None:
            found = check(data[key], key)
            if found:
                return found
    return _number_problem(data)
