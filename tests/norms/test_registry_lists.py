"""The norm registry is the only list of norms: every other place that names the norms agrees with it."""

from __future__ import annotations

from pathlib import Path

from norm_experiments.config import CONFIG_DIR
from norm_experiments.norms import registry

ROOT = Path(__file__).parents[2]


def single_process_norms() -> set[str]:
    return {name for name, record in registry.records().items() if not record.syncs_ranks}


def test_every_registered_norm_has_a_config_file_and_no_file_is_unregistered() -> None:
    files = {p.stem for p in (CONFIG_DIR / "norm").glob("*.yaml")}
    assert files == set(registry.names())


def gpu_study_norms() -> list[str]:
    """The norms the GPU study's sweeper is given, as Hydra composes the preset."""
    from hydra import compose, initialize_config_dir

    from norm_experiments.config import register_resolvers

    register_resolvers()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=norm_sweep"], return_hydra_config=True)
    return str(cfg.hydra.sweeper.params.norm).split(",")


def test_the_gpu_study_sweeps_every_single_process_norm() -> None:
    assert set(gpu_study_norms()) == single_process_norms()


def test_the_benchmark_takes_its_norms_from_the_registry() -> None:
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from benchmarks.common import ALL_NORMS
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert set(ALL_NORMS) == single_process_norms()


def test_the_readme_lists_every_norm() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (row,) = [line for line in readme.splitlines() if line.startswith("| `norm` |")]
    assert {name.strip("` ") for name in row.split("|")[2].replace("(default)", "").split(",")} == set(
        registry.names()
    )
