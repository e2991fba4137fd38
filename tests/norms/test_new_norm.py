"""Adding a norm is one record: a norm registered at run time (here for the test only) trains with our U-Net
and with MONAI's BasicUNet, is checked like every norm, and lands in the report as a row of its own."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

from norm_experiments.errors import UserError
from norm_experiments.norms import registry
from norm_experiments.norms.options import Option, count, eps
from norm_experiments.norms.reference_page import page
from norm_experiments.report import build_report
from norm_experiments.training.build import make_plan
from norm_experiments.training.loop import train
from tests.helpers import compose_config

RECORD = registry.NormRecord(
    name="half_group",
    summary="GroupNorm with half as many groups as channels",
    build=lambda channels, o: nn.GroupNorm(channels // o["divisor"], channels, eps=o["eps"]),
    options={"divisor": Option(2, count), "eps": eps()},
)


@pytest.fixture
def new_norm(monkeypatch: pytest.MonkeyPatch) -> registry.NormRecord:
    registry.load_all()
    monkeypatch.setitem(registry._RECORDS, RECORD.name, RECORD)
    return RECORD


def test_a_new_norm_trains_with_both_models_and_is_reported(new_norm, tmp_path: Path) -> None:
    common = ["experiment=smoke", "norm=group", f"norm.name={new_norm.name}", "~norm.options.num_groups"]
    common += [
        "+norm.options.divisor=2",
        "trainer.samples=4",
        "trainer.num_threads=1",
        "data.patch_size=[32,32,32]",
    ]
    for model in ("unet", "basic_unet"):
        metrics = train(compose_config([*common, f"model={model}"]), tmp_path / "sweep" / model)
        assert metrics["status"] == "completed" and metrics["norm"] == new_norm.name
        assert metrics["norm_options"] == {"divisor": 2, "eps": 1e-5}
        assert metrics["bn_family"] is False and "eval_modes" not in metrics
    report = build_report([tmp_path / "sweep"])
    assert {f"{new_norm.name} [model=basic_unet]", f"{new_norm.name} [model=unet]"} <= set(
        report.analysis.conditions[0].rows
    )


def test_a_new_norm_gets_the_checks_every_norm_gets(new_norm) -> None:
    with pytest.raises(UserError, match="norm.options.divisor must be >= 1"):
        make_plan(
            compose_config(
                [
                    "experiment=smoke",
                    "norm=group",
                    "norm.name=half_group",
                    "~norm.options.num_groups",
                    "+norm.options.divisor=0",
                ]
            )
        )
    with pytest.raises(UserError, match="did you mean 'half_group'"):
        make_plan(
            compose_config(
                ["experiment=smoke", "norm=group", "norm.name=half_gruop", "~norm.options.num_groups"]
            )
        )


def test_a_new_norm_is_in_the_gpu_study_and_the_benchmark(new_norm) -> None:
    """Both take their list from the registry: nothing else is edited."""
    import sys

    from tests.norms.test_registry_lists import ROOT, gpu_study_norms

    assert new_norm.name in gpu_study_norms()
    import importlib

    sys.path.insert(0, str(ROOT / "scripts"))
    from benchmarks import common

    try:
        # The benchmark reads the registry when it starts (a new norm module is loaded by registry.load_all).
        assert new_norm.name in importlib.reload(common).ALL_NORMS
    finally:
        sys.path.remove(str(ROOT / "scripts"))
        # The list without the test's norm, for the tests after this one in this process.
        common.ALL_NORMS = tuple(name for name in common.ALL_NORMS if name != new_norm.name)


def test_a_new_norm_appears_in_the_generated_reference_page(new_norm) -> None:
    row = [line for line in page().splitlines() if line.startswith(f"| `{new_norm.name}`")]
    assert len(row) == 1 and "`divisor` (2)" in row[0] and "| no | no |" in row[0]
