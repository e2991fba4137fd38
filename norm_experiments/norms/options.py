"""Names of the normalizations, their options with defaults, and validation of user-given options.

Every check raises UserError naming the config key as the user overrides it (``norm.options.<option>``),
because these values come from the Hydra config group ``norm`` (``configs/norm/<name>.yaml``).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any

from norm_experiments.errors import UserError

NORM_NAMES: tuple[str, ...] = (
    "batch",
    "instance",
    "group",
    "layer",
    "none",
    "batchrenorm",
    "ghostbatch",
    "syncbatch",
    "ws_group",
    "weightnorm",
    "frn",
)

# Norms whose training-mode output depends on the other samples of the batch (and whose eval-mode output
# uses running averages): the ones that change behaviour with the batch size.
BATCH_STAT_NORMS: frozenset[str] = frozenset({"batch", "batchrenorm", "ghostbatch", "syncbatch"})

_BN = {"eps": 1e-5, "momentum": 0.1}

# Defaults per norm; the keys are also the only options a norm accepts.
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "batch": dict(_BN),
    "instance": {"eps": 1e-5, "momentum": 0.1, "affine": True, "track_running_stats": False},
    "group": {"num_groups": 8, "eps": 1e-5},
    "layer": {"eps": 1e-5},
    "none": {},
    # Schedule fractions are of the run's step budget; see batchrenorm.RenormSchedule.
    "batchrenorm": {**_BN, "r_max": 3.0, "d_max": 5.0, "warmup_fraction": 0.1, "relax_end_fraction": 0.5},
    "ghostbatch": {**_BN, "virtual_batch": 2},
    "syncbatch": dict(_BN),
    "ws_group": {"num_groups": 8, "eps": 1e-5},
    "weightnorm": {},
    "frn": {"eps": 1e-6, "learnable_eps": False},
}


def option_key(option: str) -> str:
    """The config key of a norm option, as the user writes an override: norm.options.num_groups=4."""
    return f"norm.options.{option}"


def _number(option: str, value: Any) -> float:
    # bool is an int subclass; `affine: true` passed to eps would otherwise pass as 1.0.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{option_key(option)} must be a number, got {value!r}")
    return float(value)


def _integer(option: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{option_key(option)} must be an integer, got {value!r}")
    return value


def _check_bool(option: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{option_key(option)} must be true or false, got {value!r}")
    return value


def _check_positive(option: str, value: Any) -> float:
    number = _number(option, value)
    if number <= 0:
        raise UserError(f"{option_key(option)} must be > 0, got {value!r}")
    return number


def _check_momentum(option: str, value: Any) -> float | None:
    # None is PyTorch's cumulative moving average (every batch weighted equally).
    if value is None:
        return None
    number = _number(option, value)
    if not 0 < number <= 1:
        raise UserError(f"{option_key(option)} must be in (0, 1] or null (cumulative average), got {value!r}")
    return number


def _check_count(option: str, value: Any) -> int:
    number = _integer(option, value)
    if number < 1:
        raise UserError(f"{option_key(option)} must be >= 1, got {value!r}")
    return number


def _check_r_max(option: str, value: Any) -> float:
    number = _number(option, value)
    if number < 1:
        raise UserError(f"{option_key(option)} must be >= 1 (1 means plain BatchNorm), got {value!r}")
    return number


def _check_d_max(option: str, value: Any) -> float:
    number = _number(option, value)
    if number < 0:
        raise UserError(f"{option_key(option)} must be >= 0 (0 means plain BatchNorm), got {value!r}")
    return number


def _check_fraction(option: str, value: Any) -> float:
    number = _number(option, value)
    if not 0 <= number <= 1:
        raise UserError(
            f"{option_key(option)} is a fraction of the step budget and must be in [0, 1], got {value!r}"
        )
    return number


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "eps": _check_positive,
    "momentum": _check_momentum,
    "num_groups": _check_count,
    "virtual_batch": _check_count,
    "affine": _check_bool,
    "track_running_stats": _check_bool,
    "learnable_eps": _check_bool,
    "r_max": _check_r_max,
    "d_max": _check_d_max,
    "warmup_fraction": _check_fraction,
    "relax_end_fraction": _check_fraction,
}


# Common spellings of our names, used only to suggest the right name (they are not accepted as names):
# "batchnrom" is a typo of "batchnorm", so it should point to "batch", not to "batchrenorm".
_SPELLINGS = {
    "batchnorm": "batch",
    "bn": "batch",
    "instancenorm": "instance",
    "in": "instance",
    "groupnorm": "group",
    "gn": "group",
    "layernorm": "layer",
    "ln": "layer",
    "identity": "none",
    "batchrenormalization": "batchrenorm",
    "brn": "batchrenorm",
    "ghostbatchnorm": "ghostbatch",
    "ghostbn": "ghostbatch",
    "syncbatchnorm": "syncbatch",
    "syncbn": "syncbatch",
    "wsgn": "ws_group",
    "gnws": "ws_group",
    "weightstandardization": "ws_group",
    "weightnormalization": "weightnorm",
    "wn": "weightnorm",
    "filterresponsenorm": "frn",
}


def check_norm_name(name: Any) -> str:
    """Return `name` if it is a known norm, else raise UserError with a did-you-mean hint."""
    if isinstance(name, str) and name in NORM_NAMES:
        return name
    spellings = {**{n: n for n in NORM_NAMES}, **_SPELLINGS}
    typed = str(name).lower().replace("-", "").replace(" ", "")
    close = difflib.get_close_matches(typed, list(spellings), n=1)
    hint = f"; did you mean '{spellings[close[0]]}'?" if close else ""
    raise UserError(f"norm: unknown normalization '{name}'{hint} valid: {', '.join(NORM_NAMES)}")


def resolve_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults of norm `name` overridden by `options`, each value checked and normalized (int -> float)."""
    defaults = DEFAULT_OPTIONS[name]
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        valid = ", ".join(defaults) if defaults else "none"
        raise UserError(f"{option_key(unknown[0])}: not an option of norm '{name}' (valid options: {valid})")
    resolved = {**defaults, **options}
    resolved = {key: _CHECKS[key](key, value) for key, value in resolved.items()}
    if name == "batchrenorm" and resolved["warmup_fraction"] > resolved["relax_end_fraction"]:
        raise UserError(
            f"{option_key('warmup_fraction')}={resolved['warmup_fraction']} must not exceed "
            f"{option_key('relax_end_fraction')}={resolved['relax_end_fraction']}"
        )
    return resolved
