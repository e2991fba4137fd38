"""The statistics a reviewer asks for, on hand-made sweeps with per-case scores: conditions kept apart, one
family per question, every verdict (better, worse, equivalent, inconclusive, untestable) in the tables and in
the Reading, BatchNorm's gap in both directions, HD95, convergence counts, and a document header that says
where its numbers come from."""

from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

from norm_experiments.report import build_report, write_report
from norm_experiments.report.cli import main as report_main
from tests.report.conftest import grid, per_case
from tests.report.test_report_sweep import read_csv, table_rows

FORBIDDEN = ("tie", "no gap", "indistinguishable", "cannot tell apart")


def noise(s: int, c: int) -> float:
    """A fixed seed x case pattern of ±0.004 whose seed means are -0.001, 0, +0.001 and case means 0."""
    return 0.004 * ((s + 2 * c) % 3 - 1)


def section(markdown: str, title: str) -> str:
    """The first table after a heading."""
    return markdown.split(title)[1].split("\n\n")[1]


def assert_says_only_what_it_shows(markdown: str) -> None:
    lowered = markdown.lower()
    for word in FORBIDDEN:
        assert word not in lowered, word


def write_cell(write_run, sweep, norm, bs, values, **fields):
    """One run per seed without per-case scores (an older record); the fields make it a different config."""
    tag = ",".join(f"{k}={v}" for k, v in sorted(fields.items()) if isinstance(v, str))
    for seed, value in enumerate(values):
        name = f"{tag or 'runs'}/{norm}/{bs}/{seed}"
        write_run(sweep, norm, bs, seed, value, subdir=name, run_id=name, **fields)


@pytest.fixture
def verdict_sweep(tmp_path, write_cases):
    """Against instance at bs 1: group +0.10 (better), layer -0.10 (worse), frn +-0.004 of noise around 0
    (equivalent), weightnorm seed shifts of +-0.05 (inconclusive), ws_group one seed (untestable)."""
    write_cases(tmp_path, "instance", 1, grid(0.7))
    write_cases(tmp_path, "group", 1, grid(0.8, noise))
    write_cases(tmp_path, "layer", 1, grid(0.6, noise))
    write_cases(tmp_path, "frn", 1, grid(0.7, noise))
    write_cases(tmp_path, "weightnorm", 1, grid(0.7, lambda s, c: (0.05, -0.05, 0.0)[s] + noise(s, c)))
    write_cases(tmp_path, "ws_group", 1, grid(0.75, seeds=1))
    return tmp_path


def test_every_verdict_against_the_reference(verdict_sweep) -> None:
    report = build_report([verdict_sweep])
    summary = report.analysis.conditions[0]
    verdicts = {c.label: c.verdict.value for c in summary.deltas.comparisons}
    assert verdicts == {
        "group": "better",
        "layer": "worse",
        "frn": "equivalent",
        "weightnorm": "inconclusive",
        "ws_group": "untestable",
    }
    assert summary.deltas.m == 4  # the untestable row does not count in the correction
    frn = summary.delta("frn", 1)
    # frn - instance is the noise pattern: seed and case mean squares below the residual one, so the floor
    # SE^2 = MS_e / (S C) = (1.2e-4 / 6) / 12 with df = 6; alpha' = 0.05 / 4.
    assert frn.estimate.method == "seeds × cases" and frn.estimate.df == 6
    assert frn.estimate.se == pytest.approx(math.sqrt(1.2e-4 / 6 / 12))
    md = report.markdown
    deltas = table_rows(section(md, "## Difference to instance"))
    assert deltas["group"][0].endswith("] better") and deltas["layer"][0].endswith("] worse")
    assert deltas["frn"][0].endswith("] equivalent") and deltas["weightnorm"][0].endswith("] inconclusive")
    assert deltas["ws_group"] == ["+0.050 (untestable: 1 shared seed)"]
    assert "Bonferroni over the m = 4 tested comparisons" in md and "two-sided 98.75%" in md
    best = table_rows(section(md, "## Norms by verdict against instance"))
    assert best["1"] == ["group", "frn", "weightnorm", "layer", "ws_group"]
    assert "- `layer` minus `instance`, same batch size and seed: worse at bs 1 (-0.100 [" in md
    assert (
        "- `frn` minus `instance`, same batch size and seed: equivalent within ±0.02 at bs 1 (+0.000 [" in md
    )
    assert "- `weightnorm` minus `instance`, same batch size and seed: inconclusive at bs 1 (+0.000 [" in md
    assert (
        "- `ws_group` minus `instance`, same batch size and seed: untestable at bs 1 (1 shared seed)." in md
    )
    assert "- `group` minus `instance`, same batch size and seed: better at bs 1 (+0.100 [" in md
    assert_says_only_what_it_shows(md)


def test_the_margin_decides_equivalence(verdict_sweep, tmp_path) -> None:
    # frn's interval is about +-0.005: equivalent within 0.02, inconclusive within 0.004.
    narrow = build_report([verdict_sweep], margin=0.004)
    assert narrow.analysis.conditions[0].delta("frn", 1).verdict.value == "inconclusive"
    out = tmp_path / "out"
    report_main([str(verdict_sweep), "--out", str(out), "--margin", "0.004"])
    assert "equivalence margin ±0.004" in (out / "report.md").read_text()
    with pytest.raises(SystemExit) as exit_info:
        report_main([str(verdict_sweep), "--margin", "0"])
    assert exit_info.value.code == 2


def test_the_default_margin_follows_the_metric(tmp_path, write_cases) -> None:
    """--metric val_hd95 compares in mm: its default margin is 1 mm, not 0.02; BatchNorm's gaps stay in Dice
    with the Dice margin whatever the metric and its margin."""
    write_cases(tmp_path, "batch", 1, grid(0.6), batch=grid(0.9, noise), val_hd95=5.0)
    write_cases(tmp_path, "instance", 1, grid(0.7), val_hd95=4.0)
    out = tmp_path / "out"
    report_main([str(tmp_path), "--out", str(out), "--metric", "val_hd95"])
    assert "equivalence margin ±1;" in (out / "report.md").read_text()
    summary = build_report([tmp_path], metric="val_hd95", margin=3.0).analysis.conditions[0]
    assert (summary.deltas.margin, summary.gaps.margin) == (3.0, 0.02)
    dice = build_report([tmp_path], margin=0.004).analysis.conditions[0]
    assert (dice.deltas.margin, dice.gaps.margin) == (0.004, 0.004)


def test_gap_in_both_directions_and_untestable(tmp_path, write_cases) -> None:
    """bs 1: batch statistics 0.1 below running statistics (a reversed gap), bs 2: 0.3 above, PreciseBN
    equal up to noise; bs 4: one seed."""
    running = grid(0.6)
    write_cases(tmp_path, "batch", 1, running, batch=grid(0.5, noise), precise=grid(0.6, noise))
    write_cases(tmp_path, "batch", 2, running, batch=grid(0.9, noise), precise=grid(0.6, noise))
    write_cases(
        tmp_path, "batch", 4, grid(0.6, seeds=1), batch=grid(0.9, seeds=1), precise=grid(0.6, seeds=1)
    )
    report = build_report([tmp_path])
    gaps = {(c.label, c.batch_size): c.verdict.value for c in report.analysis.conditions[0].gaps.comparisons}
    assert gaps == {
        ("batch (batch stats)", 1): "worse",
        ("batch (batch stats)", 2): "better",
        ("batch (batch stats)", 4): "untestable",
        ("batch (precise BN)", 1): "equivalent",
        ("batch (precise BN)", 2): "equivalent",
        ("batch (precise BN)", 4): "untestable",
    }
    md = report.markdown
    assert (
        "- `batch`, batch statistics minus running statistics (same weights): better at bs 2 (+0.300 [" in md
    )
    assert "; worse at bs 1 (-0.100 [" in md and "; untestable at bs 4 (1 shared seed)." in md
    assert (
        "- `batch`, PreciseBN minus running statistics (same weights): equivalent within ±0.02 at bs 1 ("
        in md
    )
    rows = section(md, "## BatchNorm evaluation modes: the gap").splitlines()
    assert rows[2].startswith("| batch | 1 | batch stats | 0.525 | 0.625 | -0.100 [") and rows[2].endswith(
        "| worse |"
    )
    assert "batch stats = 4 sliding windows of one validation volume per forward" in md
    assert_says_only_what_it_shows(md)


def test_records_without_per_case_scores_fall_back_to_seeds(tmp_path, write_run) -> None:
    instance = {1: [0.70, 0.75, 0.80], 2: [0.60, 0.70, 0.65]}
    for bs, values in instance.items():
        write_cell(write_run, tmp_path, "instance", bs, values)
        write_cell(write_run, tmp_path, "batch", bs, [v - d for v, d in zip(values, (0.29, 0.30, 0.31))])
    report = build_report([tmp_path])
    delta = report.analysis.conditions[0].delta("batch", 1)
    # Differences -0.29, -0.30, -0.31: mean -0.30, sd 0.01, df 2; m = 2 -> t(0.9875, 2) = 6.205.
    assert delta.estimate.method == "seeds only" and delta.estimate.df == 2
    assert delta.high == pytest.approx(-0.30 + 6.2053 * 0.01 / math.sqrt(3), abs=1e-4)
    assert delta.verdict.value == "worse"
    md = report.markdown
    assert table_rows(section(md, "## Difference to instance"))["batch"][0].endswith("] worse §")
    assert "a paired t-test over seeds (df = seeds - 1) (§: records without per-case scores)" in md


def test_conditions_get_their_own_tables_and_families(tmp_path, write_run) -> None:
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
    # One gap family per condition: (batch, precise) at one batch size = 2 tests each.
    assert [(f.condition, f.m) for f in analysis.gaps] == [("intensity=none", 2), ("intensity=zscore", 2)]
    batch = next(r for r in results if r["norm"] == "batch")
    assert batch["minus_instance_verdict"] == "worse" and batch["gap_batch_minus_running_verdict"] == "better"


def test_bn_gap_table_hd95_and_convergence_counts(tmp_path, write_run) -> None:
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
            convergence={"still_improving": seed == 0, "metric": "val_dice_batch"},
        )
    report = write_report([tmp_path])
    gaps = {c.label: c for c in report.analysis.conditions[0].gaps.comparisons}
    assert gaps["batch (batch stats)"].difference == pytest.approx(0.51)
    assert gaps["batch (batch stats)"].verdict.value == "better"
    assert gaps["batch (precise BN)"].verdict.value == "better"  # +0.02 on every seed: no noise
    assert table_rows(report.table)["batch"] == ["0.200 ± 0.050 †1/3"]
    md = report.markdown
    hd95 = table_rows(section(md, "## HD95 (mm)"))
    assert hd95["batch"] == ["21.0 ± 1.0"] and hd95["batch (batch stats)"] == ["5.0 ± 0.0"]
    assert table_rows(section(md, "## Convergence"))["batch"] == ["1/3", "val_dice_batch"]
    assert (
        "Convergence: 1 of 3 seeds were still improving at the end (flag computed on: val_dice_batch); in 0 of 1 cells every seed was, in 0 none was."
        in md
    )
    assert "n = 3 seeds per cell (0, 1, 2)" in md and "Bonferroni over the m = 2 tested comparisons" in md
    assert (tmp_path / "results.csv").read_text().count("val_hd95_mean") == 1


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (
            (True, True, True),
            "3 of 3 seeds were still improving at the end (flag computed on: train_loss); in 1 of 1 cells every seed was, in 0 none was.",
        ),
        (
            (False, False, False),
            "0 of 3 seeds were still improving at the end (flag computed on: train_loss); in 0 of 1 cells every seed was, in 1 none was.",
        ),
    ],
)
def test_convergence_sentence_says_the_counts(tmp_path, write_run, flags, expected) -> None:
    for seed, flag in enumerate(flags):
        write_run(
            tmp_path, "group", 1, seed, 0.7, convergence={"still_improving": flag, "metric": "train_loss"}
        )
    md = build_report([tmp_path]).markdown
    assert f"- Convergence: {expected}" in md
    assert ("†3/3" in md) == all(flags)


def test_doc_header_names_the_commands_machine_versions_and_preprocessing(
    tmp_path, write_run, capsys
) -> None:
    sweep = tmp_path / "outputs" / "sweeps" / "quick"
    prep = {"intensity": "auto", "channel_intensity": ["zscore"], "target_spacing": [1.0, 1.0, 2.5]}
    for norm in ("batch", "instance"):
        write_cell(
            write_run, sweep, norm, 1, [0.5, 0.6, 0.7], machine="AMD EPYC, 2 cores", preprocessing=prep
        )
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
    assert (
        "- Preprocessing (from the runs' records): intensity=auto → zscore per channel; target spacing 1×1×2.5 mm (6 runs)"
        in text
    )
    assert "![val_dice vs batch size](results/dice_vs_batch_size.png)" in text
    assert (tmp_path / "docs" / "results" / "dice_vs_batch_size.png").stat().st_size > 1000
    assert (tmp_path / "docs" / "results" / "difference_to_instance.png").exists()
    assert not (sweep / "report.md").exists()  # --doc writes the document instead of report.md
    assert math.isfinite(float(read_csv(tmp_path / "docs" / "results" / "results.csv")[0]["val_dice_mean"]))
    assert not list((tmp_path / "docs" / "results").glob(".report-staging-*"))


def test_a_distance_is_better_when_lower(tmp_path, write_run) -> None:
    for seed in range(3):
        for norm, hd95 in (("instance", 6.0), ("group", 2.0)):
            cases = per_case({"running": {"a": 0.7, "b": 0.8}}, hd95=hd95 + 0.1 * seed)
            write_run(tmp_path, norm, 1, seed, 0.75, val_hd95=hd95 + 0.1 * seed, per_case=cases)
    report = build_report([tmp_path], metric="val_hd95")
    assert (
        "- `group` minus `instance`, same batch size and seed: better at bs 1 (-4.000 [-4.000, -4.000])."
        in report.markdown
    )
    assert "lowest mean" not in report.markdown.lower()  # no row ranks the norms


@pytest.mark.parametrize("sizes", [(1, 2), (1,)])
def test_reference_trend_sentence_only_with_two_batch_sizes(tmp_path, write_run, sizes) -> None:
    for bs in sizes:
        write_cell(write_run, tmp_path, "instance", bs, [0.8 - 0.1 * bs] * 2)
    md = build_report([tmp_path]).markdown
    sentence = "- `instance` scores 0.700 at batch size 1 and 0.600 at 2 (descriptive, not tested)"
    assert (sentence in md) == (len(sizes) == 2)
