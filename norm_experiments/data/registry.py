"""One record per dataset layout: its name, its config file, how its cases are found on disk (or, for a
dataset the project generates, the class of its parameters), how a generated dataset is written in it, its own
config keys and checks, and its docs line.

Each plug-in module of norm_experiments/data/plugins/ registers its record when it is imported; adding a layout
is one module there (or anywhere, imported before the config is checked), one file configs/data/NAME.yaml and
one row in tests/data/test_layout_registry.py. Everything that lists the layouts (the schema's data.layout,
validate_config, the data pipeline, norm-exp-synth's and norm-exp-brain's --layout, the configuration
reference) asks this registry. Torch-free: the record names its code by import path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from norm_experiments.plugins import Registry

Check = Callable[[Any], "str | None"]  # what is wrong with a value (a config_schema check), or None


@dataclass(frozen=True)
class LayoutRecord:
    """A way a dataset is laid out (on disk at data.root), or a dataset the project generates itself."""

    name: str  # data.layout=NAME; configs/data/NAME.yaml
    summary: str  # one line for the docs
    # "module:function": (root, labels or None) -> (cases, DatasetInfo), for a dataset at data.root
    find: str | None = None
    # "module:Class": a generated dataset's parameters (data.NAME holds them); generated on first use into the
    # cache in the msd layout (no data.root)
    generator: str | None = None
    # "module:function": case name -> (image, label) paths relative to the root, and "module:function":
    # (generator, cases) -> (file name, content) of the metadata file written last. With both, a generated
    # dataset can be written in this layout (norm-exp-synth --layout NAME).
    case_files: str | None = None
    metadata: str | None = None
    # Where the dataset's channel count comes from, for a message about a case with another count.
    channels_from: str = "the first image of the dataset"
    # Its own keys (data.KEY -> check) beyond the keys every layout shares in config_schema.SCHEMA.
    keys: Mapping[str, Check] = field(default_factory=dict)
    check: Callable[[dict], str | None] | None = None  # rules between its keys, on the plain data config
    config_dir: Path | None = None  # the folder holding data/NAME.yaml; None: the project's configs/

    @property
    def generated(self) -> bool:
        return self.generator is not None

    @property
    def writable(self) -> bool:
        return self.case_files is not None and self.metadata is not None


def _unknown(name: Any, close: str | None, valid: str) -> str:
    hint = f" (did you mean '{close}'?)" if close else ""
    return f"data.layout={name!r} is not one of {valid}{hint}"


REGISTRY: Registry[LayoutRecord] = Registry(
    "dataset layout", "data", "norm_experiments.data.plugins", _unknown
)
register = REGISTRY.register
records = REGISTRY.records
names = REGISTRY.names
get = REGISTRY.get


def on_disk() -> tuple[str, ...]:
    """Layouts of a dataset at data.root."""
    return tuple(name for name, record in records().items() if record.find)


def generated() -> tuple[str, ...]:
    """Datasets the project generates on first use (their parameters under data.NAME)."""
    return tuple(name for name, record in records().items() if record.generated)


def writable() -> tuple[str, ...]:
    """Layouts a generated dataset can be written in."""
    return tuple(name for name, record in records().items() if record.writable)
