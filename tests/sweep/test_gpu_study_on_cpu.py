"""The GPU study's preset (experiment=norm_study_gpu_short, what scripts/gpu_check.sh runs) through the study
sweeper and the report's document on a CPU, with a tiny budget: every step a GPU run takes, minus the GPU."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_cli

pytestmark = pytest.mark.slow

TINY = [
    "experiment=norm_study_gpu_short",
    "hydra.launcher.n_jobs=1",
    "trainer.device=cpu",
    "trainer.runs_per_gpu=1",
    "trainer.num_threads=1",
    "trainer.samples=8",
    "trainer.checkpoint_every_samples=8",
    "trainer.precise_bn_samples=4",
    "data.patch_size=[16,16,16]",
    "model.depth=2",
    "model.base_channels=8",
    "data.brain.num_cases=8",
    "data.val_fraction=0.25",
    "data.brain.spacing=6.0",
    "hydra.sweeper.study.looks=[2,3]",
]


def test_the_gpu_study_runs_on_a_cpu_with_a_tiny_budget_through_the_document(tmp_path):
    env = {"NORM_EXP_CACHE": str(tmp_path / "cache")}
    sweep = tmp_path / "study"
    result = run_cli([*TINY, f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    design = json.loads((sweep / "study.json").read_text())["design"]
    assert list(design["questions"]) == ["eval_gap_bs1", "batch_vs_instance_bs1"] and design["looks"] == [
        2,
        3,
    ]
    runs = [json.loads(p.read_text()) for p in sweep.rglob("metrics.json")]
    assert {(r["norm"], r["batch_size"]) for r in runs} == {("batch", 1), ("instance", 1)}
    assert all(r["status"] == "completed" and r["device"] == "cpu" for r in runs)
    doc = tmp_path / "results_gpu.md"
    report = run_cli([str(sweep), "--doc", str(doc)], cwd=tmp_path, module="norm_experiments.report.cli")
    assert report.returncode == 0, report.stderr[-2000:]
    text = doc.read_text()
    assert text.index("## Declared questions") < text.index("## Reading")
    assert "| eval_gap_bs1 | batch, bs 1 minus batch (batch stats), bs 1 |" in text
    assert "Runs made by `norm-exp-train experiment=norm_study_gpu_short" in text
