"""The benchmark's section f sweeps (scripts/benchmark.py profiles) expand to exactly the runs they count:
Hydra's own sweeper expands the preset's sweep parameters with the section's overrides. The preset
experiment=norm_sweep sweeps two datasets; a section that left the dataset open ran twice the runs it
counted (seen on an H200 on 2026-12-04: "0 of 4 (8 failed)")."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))  # scripts/benchmark.py is imported as the script runs it

from benchmark import PROFILES  # noqa: E402

from norm_experiments.config import CONFIG_DIR, register_resolvers  # noqa: E402


def hydra_jobs(overrides: list[str]) -> int:
    """How many runs `norm-exp-train -m OVERRIDES` launches: the preset's sweeper params, then the command
    line (the later value of a key wins), split into jobs as Hydra's basic sweeper does."""
    register_resolvers()
    fixed = [o for o in overrides if "," not in o.split("=", 1)[1]]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=fixed, return_hydra_config=True)
    params = [f"{key}={value}" for key, value in (cfg.hydra.sweeper.params or {}).items()]
    parsed = OverridesParser.create().parse_overrides(params + overrides)
    return sum(len(batch) for batch in BasicSweeper.split_arguments(parsed, max_batch_size=None))


@pytest.mark.parametrize("name", [name for name, profile in PROFILES.items() if profile.gpu_sweep])
def test_each_runs_per_gpu_sweep_launches_the_runs_it_counts(name: str) -> None:
    profile = PROFILES[name]
    seeds = ",".join(str(seed) for seed in range(profile.gpu_sweep_runs))
    assert hydra_jobs([*profile.overrides, *profile.gpu_sweep, f"seed={seeds}"]) == profile.gpu_sweep_runs


def test_the_preset_alone_would_run_both_datasets() -> None:
    """The counter-check: without the pinned dataset the same overrides launch twice the runs."""
    overrides = [o for o in PROFILES["quick"].gpu_sweep if o != "data=synthetic"]
    assert hydra_jobs([*overrides, "seed=0,1,2,3"]) == 8
