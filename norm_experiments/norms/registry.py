"""One record per normalization: everything the rest of the project needs to know about a norm, in one place.

Each norm's module registers its record (``register(NormRecord(...))``) when it is imported; ``load_all``
imports every module of this package, so adding a norm is: one module here, one file in configs/norm/, and one
row in tests/norms/test_norms_factory.py (the pattern every plug-in follows: norm_experiments/plugins.py).
Everything else (the valid names, which norms keep running statistics and get scored in BatchNorm's evaluation
modes, pre-flight checks, the MONAI registration, the conv that goes before the norm, what metrics.json says
about the norm for the report) asks the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from norm_experiments.norms.convs import plain_conv
from norm_experiments.norms.options import Option
from norm_experiments.plugins import Registry

# Evaluation modes of norms that keep running statistics: model.eval() (running), PreciseBN (precise), and
# normalizing every forward with its own statistics (batch). See norms/eval_modes.py.
EVAL_MODES = ("running", "precise", "batch")


def _always(options: dict) -> bool:
    return True


@dataclass(frozen=True)
class NormRecord:
    """A normalization the project can train and study."""

    name: str  # the config name: norm=NAME, configs/norm/NAME.yaml
    summary: str  # one line: what it normalizes over
    build: Callable[[int, dict], nn.Module]  # (channels, resolved options) -> the layer
    options: Mapping[str, Option] = field(default_factory=dict)  # the only options it accepts, with defaults
    # Training-mode output depends on the other samples of the batch: the norms whose behaviour changes
    # with the batch size.
    batch_dependent: bool = False
    # Keeps running statistics that model.eval() uses: scored in every EVAL_MODES mode at the end of a run.
    bn_family: bool = False
    # Batch statistics are computed over all DDP ranks (what BatchNorm sees is the global batch).
    syncs_ranks: bool = False
    # Patches one training-mode statistic is computed over, given (patches per rank, patches over all ranks,
    # options); None for batch-independent norms. Default for batch-dependent ones: the rank's patches.
    statistic_batch: Callable[[int, int, dict], int] | None = None
    includes_activation: bool = False  # the layer ends with its own activation (FRN's TLU): no second one
    learnable_shift: Callable[[dict], bool] = _always  # ends with a learnable shift: the conv needs no bias
    # (in, out, kernel, stride, padding, bias) -> the conv placed before this norm (weight standardization...)
    conv: Callable[..., nn.Module] = plain_conv
    groups_option: str | None = None  # channels must be divisible by options[groups_option]
    min_spatial_voxels: int = 1  # statistics per sample over D*H*W need at least this many voxels
    check: Callable[[dict], None] | None = None  # rules between options, on the resolved options
    spellings: tuple[str, ...] = ()  # other names users type, for "did you mean" (not accepted as names)
    # The norm every other norm is compared with in the report (exactly one record; must be batch-independent).
    report_reference: bool = False
    config_dir: Path | None = None  # the folder holding norm/NAME.yaml; None: the project's configs/

    @property
    def eval_modes(self) -> tuple[str, ...]:
        return EVAL_MODES if self.bn_family else ()

    def bn_batch(self, rank_patches: int, all_patches: int, options: dict) -> int | None:
        """Patches each training-mode batch statistic is computed over (None: no batch statistics)."""
        if self.statistic_batch is not None:
            return self.statistic_batch(rank_patches, all_patches, options)
        return rank_patches if self.batch_dependent else None


def _unknown(name: Any, close: str | None, valid: str) -> str:
    hint = f"; did you mean '{close}'?" if close else ""
    return f"norm: unknown normalization '{name}'{hint} valid: {valid}"


REGISTRY: Registry[NormRecord] = Registry("norm", "norm", "norm_experiments.norms", _unknown)
_RECORDS = REGISTRY.by_name
register = REGISTRY.register
load_all = REGISTRY.load_all
records = REGISTRY.records
names = REGISTRY.names


def get(name: Any) -> NormRecord:
    """The record of norm `name`; UserError with a did-you-mean hint for an unknown name."""
    return REGISTRY.get(name, [(s, r.name) for r in REGISTRY.records().values() for s in r.spellings])


def bn_family() -> frozenset[str]:
    """Names of the norms that keep running statistics (scored in BatchNorm's evaluation modes)."""
    return frozenset(n for n, r in records().items() if r.bn_family)


def report_reference() -> NormRecord:
    """The one record marked as the report's reference norm (ValueError unless exactly one batch-independent
    record is marked)."""
    marked = [r for r in records().values() if r.report_reference]
    if len(marked) != 1 or marked[0].batch_dependent:
        raise ValueError(f"exactly one batch-independent norm must set report_reference, found {marked}")
    return marked[0]
