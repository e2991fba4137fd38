"""Run naming and run identity, in one place: a single run's folder (run_dirname), a run's identity (the hash
of its config without execution-only keys, run_identity) and the folders of a sweep's runs.

Folder names of a sweep's runs: the swept keys only, in the order the sweep lists them, the first one as a
folder (`norm=group/data.batch_size=2,seed=1`), so that `tensorboard --logdir SWEEP_DIR` (which names each
run after its path) shows what differs between runs, grouped by norm. Lists read as `16x16x16` (numbers) or
`a+b` instead of `_16,16,16_`.

Which keys are swept: the sweep's own `hydra.sweeper.params` (the presets) and the command line's sweeps
(`norm=batch,group`), which the job's config no longer shows: the sweep callback (sweep/callback.py) puts
their keys into the environment (SWEPT_KEYS_ENV) before Hydra starts the jobs, which inherit it.

A folder an earlier version named (the overrides sorted alphabetically, run_dirname; or every override,
swept keys first, flat_run_name) is kept when it exists, so that running a sweep's command again still finds,
skips or continues its runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

SWEPT_KEYS_ENV = "NORM_EXP_SWEPT_KEYS"
MAX_NAME = 120  # a run folder's name: readable, and well under file systems' 255


def run_dirname(override_dirname: str) -> str:
    """A folder name for a run from its command-line overrides: readable, filesystem-safe, unique."""
    if not override_dirname:
        return "default"
    name = re.sub(r"[^A-Za-z0-9=,._+-]", "_", override_dirname)
    if len(name) > MAX_NAME:  # keep it readable; the hash keeps distinct commands apart
        digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:8]
        name = f"{name[: MAX_NAME - 9]}-{digest}"
    return name


# Keys that change where or how a run executes, not what it computes: left out of the run's identity and
# of its folder name (configs/hydra/default.yaml reads this list through the `execution_keys` resolver), so
# `trainer.overwrite=true` retrains in the run's own folder and `trainer.device=cpu` continues a GPU run.
EXECUTION_KEYS = (
    "name",
    "resume",
    "trainer.device",
    "trainer.progress",
    "trainer.num_threads",
    "trainer.overwrite",
    "trainer.force_resume",
    "trainer.trust_checkpoint",
    "trainer.log_every_steps",
    "data.cache_dir",
    "data.check_files",
    "data.cache_on_device",  # the same batches wherever the volumes are held
    # The same convolution by another CPU code path (float rounding only, like num_threads); `auto` is a pure
    # function of config, device and layer shape, so the same command resumes on the same path.
    "trainer.cpu_conv",
    "trainer.runs_per_gpu",  # how many runs share a GPU: where a run executes, not what it computes
)
# Command-line keys of Hydra's own that only say how a sweep executes.
LAUNCHER_KEYS = ("hydra.launcher.n_jobs",)


def run_identity(cfg: DictConfig) -> str:
    """Hash of the resolved config without output paths and execution-only keys: a run's identity."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    plain.pop("hydra", None)
    for key in EXECUTION_KEYS:
        *parents, leaf = key.split(".")
        node = plain
        for parent in parents:
            node = node.get(parent, {})
        if isinstance(node, dict):
            node.pop(leaf, None)
    text = json.dumps(plain, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def swept_keys(task_overrides: Iterable[str], sweeper_params: Any) -> list[str]:
    """Keys a multirun varies: the sweeper's params, then the command line's sweep overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = [str(k) for k in (sweeper_params or {})]
    for override in OverridesParser.create().parse_overrides(list(task_overrides)):
        if override.is_sweep_override() and override.key_or_group not in keys:
            keys.append(override.key_or_group)
    return keys


def readable(value: Any) -> str:
    """A value as it reads in a folder name: lists joined by 'x' (numbers) or '+' (anything else)."""
    if isinstance(value, (list, tuple, ListConfig)):
        items = [readable(v) for v in value]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        return ("x" if numbers else "+").join(items)
    if isinstance(value, (dict, DictConfig)):
        return "+".join(f"{k}-{readable(v)}" for k, v in value.items())
    return str(value)


def safe(name: str) -> str:
    """Filesystem-safe and at most MAX_NAME characters (a hash keeps distinct names apart when cut)."""
    cleaned = re.sub(r"[^A-Za-z0-9=,._+-]", "_", name)
    if len(cleaned) > MAX_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        cleaned = f"{cleaned[: MAX_NAME - 9]}-{digest}"
    return cleaned


def _items(task_overrides: Iterable[str], exclude_keys: Iterable[str]) -> dict[str, str]:
    """key -> 'key=value' of the job's overrides, execution-only keys left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    excluded = set(exclude_keys)
    items: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(list(task_overrides)):
        key = override.key_or_group
        if key not in excluded:
            value = override.value()
            value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
            items[key] = f"{key}={readable(value)}"
    return items


def flat_run_name(task_overrides: Iterable[str], swept: list[str], exclude_keys: Iterable[str] = ()) -> str:
    """The previous naming: every `key=value` of the job's overrides joined by ',', swept keys first (in
    `swept` order), the rest sorted; `exclude_keys` (execution-only keys, EXECUTION_KEYS) left out."""
    items = _items(task_overrides, exclude_keys)
    first = [items.pop(k) for k in swept if k in items]
    return safe(",".join(first + sorted(items.values()))) if first or items else "default"


def sweep_run_name(task_overrides: Iterable[str], swept: list[str], exclude_keys: Iterable[str] = ()) -> str:
    """A run's folder inside its sweep: `norm=group/data.batch_size=2,seed=1`, the first swept key's value as a
    folder (TensorBoard's run filter and colour-by-regex group the runs by it), the other swept keys in
    `swept` order in the run's own name. What every run of the sweep shares (`experiment=...`) is left out:
    the sweep's multirun.yaml and each run's .hydra/ keep it. With no swept key known, the flat name."""
    items = _items(task_overrides, exclude_keys)
    own = [items[k] for k in swept if k in items]
    if not own:
        return flat_run_name(task_overrides, swept, exclude_keys)
    group, rest = own[0], own[1:]
    return f"{safe(group)}/{safe(','.join(rest))}" if rest else safe(group)


def sweep_subdir(sweep_dir: str, override_dirname: str, task_overrides: Any, sweeper_params: Any) -> str:
    """The `sweep_run_dirname` resolver (configs/hydra/default.yaml): a job's folder inside the sweep."""
    task = list(task_overrides or [])
    keys = swept_keys([], sweeper_params)
    keys += [k for k in os.environ.get(SWEPT_KEYS_ENV, "").split(",") if k and k not in keys]
    excluded = [*EXECUTION_KEYS, *LAUNCHER_KEYS]
    for legacy in (run_dirname(override_dirname), flat_run_name(task, keys, excluded)):
        if (Path(sweep_dir) / legacy).is_dir():  # a sweep started by an earlier version: found again
            return legacy
    return sweep_run_name(task, keys, excluded)


def register() -> None:
    """The resolvers configs/hydra/default.yaml names folders with; registering twice is harmless."""
    if not OmegaConf.has_resolver("run_dirname"):
        OmegaConf.register_new_resolver("run_dirname", run_dirname)
    if not OmegaConf.has_resolver("sweep_run_dirname"):
        OmegaConf.register_new_resolver("sweep_run_dirname", sweep_subdir)
    if not OmegaConf.has_resolver("execution_keys"):
        OmegaConf.register_new_resolver("execution_keys", lambda: [*EXECUTION_KEYS, *LAUNCHER_KEYS])
