"""The statistics a reviewer asks for, on hand-made sweeps: conditions kept apart, differences to a reference
norm paired over seeds, Holm-corrected verdicts, BatchNorm's evaluation gaps, HD95, convergence marks, and a
document whose header says where its numbers come from."""

from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

from norm_experiments.report import build_report, write_report
from norm_experiments.report.cli import main as report_main
from norm_experiments.report.stats import holm, paired_t_test
from tests.report.test_report_sweep import read_csv, table_rows


def test_holm_adjusts_step_down_and_keeps_the_input_order() -> None:
    # Sorted: 0.01 (x3), 0.03 (x2), 0.04 (x1); monotone: the last is max(0.06, 0.04) = 0.06.
    assert holm([0.04, 0.01, 0.03]) == pytest.approx([0.06, 0.03, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.2]) == [0.2] and holm([]) == []


def test_paired_interval_of_the_mean_difference() -> None:
    # Differences 0.1, 0.2, 0.3: mean 0.2, sd 0.1, t(0.975, 2) = 4.3027 -> half-width 0.2484.
    test = paired_t_test({0: 0.6, 1: 0.7, 2: 0.8}, {0: 0.5, 1: 0.5, 2: 0.5})
    assert (test.ci_low, test.ci_high) == (
        pytest.approx(0.2 - 0.24841, abs=1e-4),
        pytest.approx(0.44841, abs=1e-4),
    )


def write_cell(write_run, sweep, norm, bs, values, **fields):
    """One run per seed; the fields (e.g. intensity) make it a different config: its own run_id and folder."""
    tag = ",".join(f"{k}={v}" for k, v in sorted(fields.items()) if isinstance(v, str))
    for seed, value in enumerate(values):
        name = f"{tag or 'runs'}/{norm}/{bs}/{seed}"
        write_run(sweep, norm, bs, seed, value, subdir=name, run_id=name, **fields)


def test_conditions_get_their_own_tables_and_are_never_averaged(tmp_path, write_run) -> None:
    for intensity, dice in (("none", [0.2, 0.3, 0.25]), ("zscore", [0.7, 0.75, 0.8])):
        write_cell(write_run, tmp_path, "batch", 1, dice, intensity=intensity, budget_unit="patches")
        write_cell(
            write_run, tmp_path, "instance", 1, [0.8, 0.8, 0.8], intensity=intensity, budget_unit="patches"
        )
    report = write_report([tmp_path])
    analysis = report.analysis
    assert [s.condition for s in analysis.conditions] == ["intensity=none", "intensity=zscore"]
    assert analysis.constant == "budget_unit=patches"
    tables = report.table.split("\n\n")
    assert table_rows(tables[0].split("\n", 1)[1])["batch"] == ["0.250 ± 0.050"]
    assert table_rows(tables[1].split("\n", 1)[1])["batch"] == ["0.750 ± 0.050"]
    assert "## Condition: intensity=zscore" in report.markdown
    results = read_csv(tmp_path / "results.csv")
    assert {(r["condition"], r["norm"]) for r in results} == {
        (c, n) for c in ("intensity=none", "intensity=zscore") for n in ("batch", "instance")
    }
    # The gap family spans both conditions: 2 conditions x (batch, precise) = 4 tests, one Holm correction.
    assert len(analysis.gaps) == 4 and {g.condition for g in analysis.gaps} == {
        "intensity=none",
        "intensity=zscore",
    }


def test_differences_to_the_reference_are_paired_and_holm_corrected(tmp_path, write_run) -> None:
    instance = {1: [0.70, 0.75, 0.80], 2: [0.60, 0.70, 0.65]}
    for bs, values in instance.items():
        write_cell(write_run, tmp_path, "instance", bs, values)
        # group: the same as instance up to +-0.005; batch: 0.3 below with +-0.01 of paired noise
        write_cell(write_run, tmp_path, "group", bs, [v + d for v, d in zip(values, (0.005, -0.005, 0.0))])
        write_cell(write_run, tmp_path, "batch", bs, [v - d for v, d in zip(values, (0.29, 0.30, 0.31))])
    report = build_report([tmp_path])
    summary = report.analysis.conditions[0]
    assert summary.reference == "instance"
    batch = summary.delta("batch", 1)
    assert batch.test.mean_diff == pytest.approx(-0.30) and batch.significant
    assert batch.test.ci_low < -0.30 < batch.test.ci_high
    assert summary.delta("group", 1).significant is False
    # Family: batch, its precise and batch-stats rows, group, at two batch sizes = 8 differences.
    assert len(summary.deltas) == 8
    adjusted = sorted(d.p_holm for d in summary.deltas)
    assert adjusted == sorted(holm([d.test.p_value for d in summary.deltas]))
    rows = table_rows(report.markdown.split("## Difference to instance")[1].split("\n\n")[1])
    assert rows["batch"][0].startswith("-0.300 [") and rows["batch"][0].endswith("] *")
    assert not rows["group"][0].endswith("*")
    assert "batch worse at bs 1, 2" in report.markdown


def test_holm_can_turn_raw_wins_into_ties(tmp_path, write_run) -> None:
    """The leader against three norms with raw p = 0.026, 0.020 and 0.053: uncorrected, two would be beaten;
    Holm over the three comparisons at this batch size gives 0.052, 0.059, 0.059: all three are ties."""
    leader = [0.8, 0.9, 1.0]
    write_cell(write_run, tmp_path, "group", 1, leader)
    for norm, diffs in (
        ("layer", (0.2, 0.25, 0.35)),
        ("instance", (0.2, 0.26, 0.33)),
        ("batch", (0.1, 0.2, 0.25)),
    ):
        write_cell(write_run, tmp_path, norm, 1, [v - d for v, d in zip(leader, diffs)])
    best = build_report([tmp_path]).analysis.conditions[0].best[1]
    assert best.leader == "group"
    raw = {c.against: c.test.p_value for c in best.comparisons}
    assert raw == {
        "layer": pytest.approx(0.0263, abs=1e-3),
        "instance": pytest.approx(0.0197, abs=1e-3),
        "batch": pytest.approx(0.0533, abs=1e-3),
    }
    assert all(c.p_holm >= 0.05 for c in best.comparisons)
    assert sorted(best.indistinguishable) == ["batch", "group", "instance", "layer"]


def test_bn_gap_table_and_hd95_and_convergence_marks(tmp_path, write_run) -> None:
    for seed, (running, batch) in enumerate([(0.20, 0.70), (0.25, 0.72), (0.15, 0.71)]):
        write_run(
            tmp_path,
            "batch",
            1,
            seed,
            running,
            eval_modes={"running": running, "precise": running + 0.02, "batch": batch},
            val_hd95=20.0 + seed,
            eval_modes_hd95={"running": 20.0 + seed, "batch": 5.0, "precise": 19.0},
            convergence={
                "since_fraction": 0.75,
                "late_gain": 0.05 if seed == 0 else 0.0,
                "still_improving": seed == 0,
            },
        )
    report = write_report([tmp_path])
    gaps = {g.comparison.label: g.comparison for g in report.analysis.gaps}
    assert (
        gaps["batch (batch stats)"].test.mean_diff == pytest.approx(0.51)
        and gaps["batch (batch stats)"].significant
    )
    assert gaps["batch (precise BN)"].test.p_value < 1e-12  # +0.02 on every seed, up to rounding
    assert table_rows(report.table)["batch"] == ["0.200 ± 0.050 †"]
    md = report.markdown
    hd95 = table_rows(md.split("## HD95 (mm)")[1].split("\n\n")[1])
    assert hd95["batch"] == ["21.0 ± 1.0"] and hd95["batch (batch stats)"] == ["5.0 ± 0.0"]
    assert table_rows(md.split("## Convergence")[1].split("\n\n")[1])["batch"] == ["1/3"]
    assert (
        "n = 3 seeds per cell (0, 1, 2)" in md and "df = 2" in md and "Holm correction over all m = 2" in md
    )
    assert (tmp_path / "results.csv").read_text().count("val_hd95_mean") == 1


def test_doc_header_names_the_commands_machine_and_versions(tmp_path, write_run, capsys) -> None:
    sweep = tmp_path / "outputs" / "sweeps" / "quick"
    for norm in ("batch", "instance"):
        write_cell(write_run, sweep, norm, 1, [0.5, 0.6, 0.7], machine="AMD EPYC, 2 cores")
    OmegaConf.save(
        {"hydra": {"overrides": {"task": ["experiment=norm_sweep_quick"]}}}, sweep / "multirun.yaml"
    )
    doc = tmp_path / "docs" / "results.md"
    report_main([str(sweep), "--doc", str(doc)])
    text = doc.read_text()
    assert f"Written by `norm-exp-report {sweep} --doc {doc}`" in text
    assert "Runs made by `norm-exp-train experiment=norm_sweep_quick`" in text
    assert "Machine: AMD EPYC, 2 cores; device: cpu." in text
    assert "Libraries: monai 1.6.1, torch 2.13.0." in text
    assert "![val_dice vs batch size](results/dice_vs_batch_size.png)" in text
    assert (tmp_path / "docs" / "results" / "dice_vs_batch_size.png").stat().st_size > 1000
    assert (tmp_path / "docs" / "results" / "difference_to_instance.png").exists()
    assert not (sweep / "report.md").exists()  # --doc writes the document instead of report.md
    assert math.isfinite(float(read_csv(tmp_path / "docs" / "results" / "results.csv")[0]["val_dice_mean"]))
