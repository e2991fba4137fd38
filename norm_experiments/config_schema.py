"""Every config key the project reads, with its type and range: one table, checked before any work.

A wrong type (`data.patch_size=16`, `optim.lr=abc`), an impossible value (`model.depth=-1`) or a key nobody
reads (`+trainer.sampels=10`, a typo Hydra's own hint suggests adding) is refused with one line naming the
key. Model names and dataset layouts are the model and layout registries' (models/registry.py,
data/registry.py, read when a value is checked, so that this module stays torch-free), and so are a plug-in's
own keys and checks (its record's `keys` and `check`). Norm names and options are checked by the norm registry
(norms/registry.py), a generated dataset's knobs (data.synthetic, data.brain) by its parameters' class; the
keys of Hydra's own `hydra.*` node are Hydra's.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from norm_experiments.errors import UserError

Check = Callable[[Any], str | None]  # returns what is wrong with a value, or None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(low: int | None = None, high: int | None = None) -> Check:
    def check(value: Any) -> str | None:
        if not _is_int(value) or (low is not None and value < low) or (high is not None and value > high):
            if high is not None:
                return f"a whole number in [{low}, {high}]"
            return "a whole number" + (f" >= {low}" if low is not None else "")
        return None

    return check


def number(
    low: float | None = None, high: float | None = None, open_low: bool = False, open_high: bool = False
) -> Check:
    """A number in [low, high] (an end excluded where open_*)."""

    def check(value: Any) -> str | None:
        ok = _is_number(value)
        ok = ok and (low is None or (value > low if open_low else value >= low))
        ok = ok and (high is None or (value < high if open_high else value <= high))
        if ok:
            return None
        lo = "" if low is None else ("(" if open_low else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if open_high else "]")
        if low is not None and high is not None:
            return f"a number in {lo}, {hi}"
        return "a number" + (f" {'>' if open_low else '>='} {low:g}" if low is not None else "")

    return check


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def choice(*options: Any) -> Check:
    def check(value: Any) -> str | None:
        return (
            None
            if value in options and type(value) is not float
            else "one of " + ", ".join(typed(o) for o in options)
        )

    return check


def typed(value: Any) -> str:
    """A config value as a user types it in an override: true / false / null and [16, 16, 16], not Python's
    True / False / None."""
    if isinstance(value, list):
        return "[" + ", ".join(map(typed, value)) + "]"
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def registered(kind: str) -> Check:
    """One of the names in a registry ("model" or "layout"), asked when a value is checked."""

    def check(value: Any) -> str | None:
        valid = _registry(kind).names()
        return None if value in valid and isinstance(value, str) else "one of " + ", ".join(valid)

    return check


def _registry(kind: str):
    if kind == "model":
        from norm_experiments.models import registry
    else:
        from norm_experiments.data import registry  # type: ignore[no-redef]
    return registry


def sequence(length: int | None, item: Check, what: str) -> Check:
    def check(value: Any) -> str | None:
        if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
            return f"a list of {length or 'any number of'} {what}"
        return next((f"a list of {length or 'any number of'} {what}" for v in value if item(v)), None)

    return check


def optional(check: Check) -> Check:
    def wrapped(value: Any) -> str | None:
        problem = check(value)
        return None if value is None or problem is None else f"{problem}, or null"

    return wrapped


def either(*checks: Check) -> Check:
    def check(value: Any) -> str | None:
        problems = [c(value) for c in checks]
        return None if any(p is None for p in problems) else " or ".join(p for p in problems if p)

    return check


def text(value: Any) -> str | None:
    return None if isinstance(value, str) else "a string"


def folder_name(value: Any) -> str | None:
    """`name`: the sweep's folder under outputs/sweeps/ (configs/hydra/default.yaml). Subfolders are fine; a
    `..`, `.` or empty part, or a leading `/`, would put it elsewhere (`../x` is outputs/x)."""
    if not isinstance(value, str):
        return "a string"
    if any(part in ("", ".", "..") for part in value.split("/")):
        return "a folder name under outputs/sweeps/ (sub/folders allowed; no '..', '.' or empty part, no leading '/')"
    return None


def anything(value: Any) -> str | None:
    return None


def mapping(value: Any) -> str | None:
    return None if isinstance(value, dict) else "a mapping"


POSITIVE = integer(1)
FRACTION = number(0, 1)
SIZES = sequence(3, integer(1), "whole numbers >= 1")

# The checks of every key. Keys in `data.synthetic` and `norm.options` are checked where they are used
# (SynthConfig, BrainConfig, the norm registry); a key under a group below that this table lacks is refused as unknown.
SCHEMA: dict[str, Check] = {
    "name": folder_name,  # a multirun writes to outputs/sweeps/<name>/ (subfolders allowed; no "..", "." or empty part)
    "seed": integer(0, 2**32 - 1),  # what numpy's and torch's seeding accept
    "resume": optional(text),
    # data (common to every layout)
    "data.layout": registered("layout"),  # on disk, or generated: the layout registry (data/registry.py)
    "data.root": optional(text),
    "data.labels": optional(either(mapping, sequence(None, text, "class names"))),
    "data.cache_dir": text,
    "data.batch_size": POSITIVE,
    "data.patches_per_volume": POSITIVE,
    "data.patch_size": SIZES,
    "data.pad_to_patch": boolean,
    "data.foreground_fraction": FRACTION,
    "data.val_fraction": number(0, 1, open_low=True, open_high=True),
    "data.val_cases": optional(sequence(None, text, "case names")),
    "data.split_seed": integer(),
    "data.target_spacing": optional(
        either(choice("auto"), sequence(3, number(0, open_low=True), "spacings in mm > 0"))
    ),
    "data.intensity": choice("auto", "zscore", "ct", "none"),
    "data.modality": optional(
        either(text, sequence(None, text, "names"))
    ),  # folder layout: CT or per channel
    "data.preset": text,  # a dataset preset's own name (data=msd_hippocampus), for messages
    "data.fetch": text,  # the norm-exp-fetch arguments that put a preset's dataset in place
    "data.augment.flip_prob": FRACTION,
    "data.augment.rot90_prob": FRACTION,
    "data.cache_on_device": boolean,
    "data.check_files": boolean,
    # model
    "model.name": registered("model"),  # the network: the model registry (models/registry.py)
    "model.depth": POSITIVE,
    "model.base_channels": POSITIVE,
    "model.growth": number(0, open_low=True),
    "model.max_channels": POSITIVE,
    "model.features": sequence(6, integer(1), "whole numbers >= 1"),
    "model.patch_size": SIZES,  # dynunet: the patch it is planned for (data.patch_size)
    "model.max_depth": POSITIVE,  # dynunet: most downsamplings
    # norm (name and options: the norm registry)
    "norm.name": text,
    # optim
    "optim.name": choice("adamw", "sgd"),
    "optim.lr": number(0, open_low=True),
    "optim.weight_decay": number(0),
    "optim.betas": sequence(2, number(0, 1, open_high=True), "numbers in [0, 1)"),
    "optim.momentum": number(0, 1, open_high=True),
    "optim.schedule": choice("cosine", "poly", "constant"),
    "optim.warmup_fraction": number(0, 1, open_high=True),
    "optim.lr_scaling": choice("none", "linear", "sqrt"),
    "optim.reference_batch": POSITIVE,
    # trainer
    "trainer.budget_unit": choice("patches", "steps"),
    "trainer.samples": POSITIVE,
    "trainer.steps": POSITIVE,
    "trainer.validations": POSITIVE,
    "trainer.device": choice("auto", "cpu", "cuda"),
    "trainer.amp": choice("auto", True, False),
    "trainer.compile": boolean,
    "trainer.channels_last": choice("auto", True, False),
    "trainer.cpu_conv": choice("auto", "split", "torch"),  # norms/cpu_conv.py
    "trainer.deterministic": boolean,
    "trainer.runs_per_gpu": POSITIVE,  # training/build.py memory_share
    "trainer.num_threads": optional(POSITIVE),
    "trainer.sw_batch_size": POSITIVE,
    "trainer.batch_stats_windows": optional(POSITIVE),  # training/evaluate.py Inference.for_mode
    "trainer.accumulate_steps": POSITIVE,  # training/loop.py Run.optimizer_step
    "trainer.sw_overlap": number(0, 1, open_high=True),
    "trainer.eval_modes": boolean,
    "trainer.remedy_modes": boolean,
    "trainer.save_predictions": boolean,  # training/predictions.py
    "trainer.precise_bn_samples": POSITIVE,
    "trainer.checkpoint_every_samples": POSITIVE,
    "trainer.log_every_steps": POSITIVE,
    "trainer.progress": choice("auto", "bar", "log", "none"),
    "trainer.overwrite": boolean,
    "trainer.force_resume": boolean,
    "trainer.trust_checkpoint": boolean,
    "trainer.world_size": POSITIVE,  # set by the training code under torchrun
}

# Nodes whose keys are checked elsewhere, and nodes that are not ours (with data.NAME of every generated
# dataset: checked_elsewhere()).
CHECKED_ELSEWHERE = ("norm.options", "hydra", "experiment")


def checked_elsewhere() -> tuple[str, ...]:
    """CHECKED_ELSEWHERE and the parameters' node of each generated dataset (the layout registry's)."""
    from norm_experiments.data import registry as layouts

    return (*(f"data.{name}" for name in layouts.generated()), *CHECKED_ELSEWHERE)


def plugin_keys() -> dict[str, Check]:
    """The keys registered models and layouts add to SCHEMA (their records' `keys`)."""
    keys: dict[str, Check] = {}
    for kind in ("model", "layout"):
        for record in _registry(kind).records().values():
            keys.update(record.keys)
    return keys


def full_schema() -> dict[str, Check]:
    """SCHEMA with every registered plug-in's own keys."""
    return {**SCHEMA, **plugin_keys()}


def leaves(
    node: dict, prefix: str = "", schema: dict[str, Check] | None = None, skip: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """Every leaf key of a plain config as 'a.b.c' -> value (lists are leaves), skipping checked_elsewhere()."""
    schema = SCHEMA if schema is None else schema
    skip = checked_elsewhere() if skip is None else skip
    found: dict[str, Any] = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        if any(path == other or path.startswith(other + ".") for other in skip):
            continue
        if isinstance(value, dict) and value and path not in schema:  # a mapping-valued key is one leaf
            found.update(leaves(value, path + ".", schema, skip))
        else:
            found[path] = value
    return found


def plugin_problem(plain: dict) -> str | None:
    """What the chosen model's and layout's own checks (their records' `check`) find wrong, or None."""
    for kind, group, key in (("model", "model", "name"), ("layout", "data", "layout")):
        node = plain.get(group)
        if not isinstance(node, dict) or node.get(key) not in _registry(kind).names():
            continue
        record = _registry(kind).get(node[key])
        problem = record.check(node) if record.check else None
        if problem:
            return f"{group}={record.name}: {problem}"
    return None


def validate(cfg: DictConfig, extra: dict[str, Check] | None = None) -> None:
    """Refuse unknown keys and values of the wrong type or range, naming the key: one UserError. `extra`:
    the keys of an app's own root config (norm-exp-check's `weights`, ...)."""
    schema = {**full_schema(), **(extra or {})}
    plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    for key, value in leaves(plain, schema=schema).items():  # type: ignore[arg-type]
        check = schema.get(key)
        if check is None:
            close = difflib.get_close_matches(key, list(schema), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise UserError(f"{key}: not a key this project reads{hint}")
        if value == "???":
            raise UserError(f"{key}: required; add {key}=...")
        problem = check(value)
        if problem:
            raise UserError(f"{key}: must be {problem}, got {value!r}")
    problem = plugin_problem(plain) or combination_problem(plain)  # type: ignore[arg-type]
    if problem:
        raise UserError(problem)


def combination_problem(plain: dict) -> str | None:
    """Two keys whose values are each valid but do nothing together (a silently ignored request)."""
    trainer = plain.get("trainer") or {}
    if trainer.get("remedy_modes") and not trainer.get("eval_modes", True):
        return (
            "trainer.remedy_modes=true: the remedies are scored among the evaluation modes, which "
            "trainer.eval_modes=false turns off; set trainer.eval_modes=true, or trainer.remedy_modes=false"
        )
    return None
