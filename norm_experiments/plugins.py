"""One registry pattern for every kind of plug-in: normalizations, models and dataset layouts.

A plug-in is one module that registers one record when it is imported (``register(SomeRecord(...))``), one
YAML file in its config group (``configs/GROUP/NAME.yaml``, or in a folder of its own named by the record's
`config_dir` and given to Hydra with ``hydra.searchpath``) and one row in its test. A record says at least
the plug-in's name, its one-line docs description (`summary`) and where its config file is; each kind adds
what it needs (a norm's layer, a model's builder, a layout's case finder) and its checks.

Everything that lists plug-ins asks its registry: the config schema (model.name, data.layout), the
configuration reference, the README's tables (checked by tests), the sweeps and the report. No other module
holds a list of their names (tests/test_registry_pattern.py greps the package for one).

This module and the model and layout registries are torch-free: a record names its torch code by import path
("package.module:function"), imported only when it is built (`resolve`).
"""

from __future__ import annotations

import difflib
import importlib
import os
import pkgutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from norm_experiments.errors import UserError

# configs/ beside the package (config.CONFIG_DIR; repeated here so that the registries import nothing above
# them).
PROJECT_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# Plug-ins outside the package: modules to import (comma-separated) before any registry is read, so that the
# command-line tools find them (NORM_EXP_PLUGINS=my_norms,lab.layouts norm-exp-train norm=mine ...).
PLUGINS_ENV = "NORM_EXP_PLUGINS"


def load_outside_plugins() -> None:
    """Import the modules NORM_EXP_PLUGINS names (each registers its records when imported); UserError naming
    a module that cannot be imported."""
    for name in filter(None, (n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(name)
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - any error of the user's module (syntax, a name): one line
            raise UserError(f"{PLUGINS_ENV}: cannot import {name} ({type(err).__name__}: {err})") from None


class Record(Protocol):
    name: str
    summary: str
    config_dir: Path | None


R = TypeVar("R", bound=Record)


def config_file(group: str, record: Record) -> Path:
    """The record's YAML file: GROUP/NAME.yaml in its own config folder, or in the project's configs/."""
    return (record.config_dir or PROJECT_CONFIGS) / group / f"{record.name}.yaml"


def resolve(path: str) -> Any:
    """The object an import path names: "package.module:attribute" (imported now)."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def closest(typed: Any, spellings: dict[str, str]) -> str | None:
    """The name whose spelling (spelling -> name) is closest to what was typed, or None."""
    text = str(typed).lower().replace("-", "").replace(" ", "")
    close = difflib.get_close_matches(text, list(spellings), n=1)
    return spellings[close[0]] if close else None


class Registry(Generic[R]):
    """The records of one kind of plug-in, by name.

    kind: what a plug-in is called in messages ("model"); group: its Hydra config group ("model"); package:
    the package whose modules register the built-in plug-ins (every module not starting with "_" is imported
    once, by `load_all`); unknown: the message for an unknown name, from (the name typed, the closest name
    or None, the valid names joined by ", ").
    """

    def __init__(
        self, kind: str, group: str, package: str, unknown: Callable[[Any, str | None, str], str]
    ) -> None:
        self.kind, self.group, self.package, self.unknown = kind, group, package, unknown
        self.by_name: dict[str, R] = {}

    def register(self, record: R) -> R:
        if record.name in self.by_name and self.by_name[record.name] != record:
            raise ValueError(f"{self.kind} '{record.name}' is registered twice")
        self.by_name[record.name] = record
        return record

    def load_all(self) -> None:
        """Import every module of the package once, so every built-in plug-in has registered itself, and the
        modules NORM_EXP_PLUGINS names (plug-ins outside the package)."""
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{self.package}.{module.name}")
        load_outside_plugins()

    def records(self) -> dict[str, R]:
        """Every registered plug-in, by name, in alphabetical order."""
        self.load_all()
        return dict(sorted(self.by_name.items()))

    def names(self) -> tuple[str, ...]:
        return tuple(self.records())

    def get(self, name: Any, spellings: Iterable[tuple[str, str]] = ()) -> R:
        """The record of `name`; UserError with a did-you-mean hint for an unknown name. `spellings`: other
        (spelling, name) pairs users type."""
        found = self.records()
        if isinstance(name, str) and name in found:
            return found[name]
        close = closest(name, {n: n for n in found} | dict(spellings))
        raise UserError(self.unknown(name, close, ", ".join(found)))

    def config_file(self, record: R) -> Path:
        return config_file(self.group, record)

    def config_files(self) -> dict[str, Path]:
        """name -> the plug-in's YAML file."""
        return {name: self.config_file(record) for name, record in self.records().items()}
