"""One record per network: its name, its config file, its builder and level layout (by import path, so that
this registry, and the config schema that reads it, import no torch), its own config keys and checks, and its
docs line.

Each plug-in module of norm_experiments/models/plugins/ registers its record when it is imported; adding a
model is one module there (or anywhere, imported before the config is checked), one file configs/model/NAME.yaml
and one row in tests/models/test_model_registry.py. Everything that lists the models (the schema's
model.name, the configuration reference, the README's table) asks this registry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from norm_experiments.plugins import Registry

# What is wrong with a value (a config_schema check), or None.
Check = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class ModelRecord:
    """A network the project can train with every norm."""

    name: str  # the config name: model=NAME, configs/model/NAME.yaml, model.name
    summary: str  # one line for the docs
    # "module:function": (model config, NormSpec, in channels, out channels, spacing in mm or None) -> nn.Module
    build: str
    # "module:function": (model config, patch size, spacing or None) -> its models.Level list, full resolution
    # first, bottleneck last (what the pre-flight check reads)
    levels: str
    # Its own keys (model.KEY -> check) beyond the keys every model shares in config_schema.SCHEMA.
    keys: Mapping[str, Check] = field(default_factory=dict)
    check: Callable[[dict], str | None] | None = None  # rules between its keys, on the plain model config
    config_dir: Path | None = None  # the folder holding model/NAME.yaml; None: the project's configs/


def _unknown(name: Any, close: str | None, valid: str) -> str:
    hint = f" (did you mean '{close}'?)" if close else ""
    return f"model.name: unknown model {name!r}{hint}; valid: {valid}"


REGISTRY: Registry[ModelRecord] = Registry("model", "model", "norm_experiments.models.plugins", _unknown)
register = REGISTRY.register
records = REGISTRY.records
names = REGISTRY.names
get = REGISTRY.get
