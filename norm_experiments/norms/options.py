"""Options of the normalizations: their kinds (a positive number, a fraction, a flag...), defaults and checks.

Every check raises UserError naming the config key as the user overrides it (``norm.options.<option>``),
because these values come from the Hydra config group ``norm`` (``configs/norm/<name>.yaml``). Which options
a norm takes is part of its record (norms/registry.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from norm_experiments.errors import UserError


def option_key(option: str) -> str:
    """The config key of a norm option, as the user writes an override: norm.options.num_groups=4."""
    return f"norm.options.{option}"


@dataclass(frozen=True)
class Option:
    """One option of a norm: its default and the check that validates (and normalizes) a given value."""

    default: Any
    check: Callable[[str, Any], Any]  # (option name, value) -> the value to use; UserError if invalid


def _number(option: str, value: Any) -> float:
    # bool is an int subclass; `affine: true` passed to eps would otherwise pass as 1.0.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{option_key(option)} must be a number, got {value!r}")
    return float(value)


def flag(option: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{option_key(option)} must be true or false, got {value!r}")
    return value


def positive(option: str, value: Any) -> float:
    number = _number(option, value)
    if number <= 0:
        raise UserError(f"{option_key(option)} must be > 0, got {value!r}")
    return number


def momentum(option: str, value: Any) -> float | None:
    # None is PyTorch's cumulative moving average (every batch weighted equally).
    if value is None:
        return None
    number = _number(option, value)
    if not 0 < number <= 1:
        raise UserError(f"{option_key(option)} must be in (0, 1] or null (cumulative average), got {value!r}")
    return number


def count(option: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{option_key(option)} must be an integer, got {value!r}")
    if value < 1:
        raise UserError(f"{option_key(option)} must be >= 1, got {value!r}")
    return value


def at_least(bound: float, meaning: str) -> Callable[[str, Any], float]:
    """A number >= bound, e.g. BatchRenorm's r_max >= 1 ('1 means plain BatchNorm')."""

    def check(option: str, value: Any) -> float:
        number = _number(option, value)
        if number < bound:
            raise UserError(f"{option_key(option)} must be >= {bound:g} ({meaning}), got {value!r}")
        return number

    return check


def fraction_of_budget(option: str, value: Any) -> float:
    number = _number(option, value)
    if not 0 <= number <= 1:
        raise UserError(
            f"{option_key(option)} is a fraction of the step budget and must be in [0, 1], got {value!r}"
        )
    return number


# The options most norms share.
def eps(default: float = 1e-5) -> Option:
    return Option(default, positive)


def running_momentum(default: float | None = 0.1) -> Option:
    return Option(default, momentum)


def resolve(name: str, accepted: Mapping[str, Option], given: Mapping[str, Any]) -> dict[str, Any]:
    """The defaults of norm `name` overridden by `given`, each value checked and normalized (int -> float)."""
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        valid = ", ".join(accepted) if accepted else "none"
        raise UserError(f"{option_key(unknown[0])}: not an option of norm '{name}' (valid options: {valid})")
    merged = {key: given.get(key, option.default) for key, option in accepted.items()}
    return {key: accepted[key].check(key, value) for key, value in merged.items()}
