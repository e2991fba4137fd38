"""End-to-end: hand-made sweeps -> tables, CSVs, report.md and plots."""

from __future__ import annotations

import csv
import time

import matplotlib.image
import pytest

from norm_experiments.errors import UserError
from norm_experiments.report import build_report, write_report
from norm_experiments.report.collect import collect

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def table_rows(table: str) -> dict[str, list[str]]:
    """Markdown table -> {first cell: other cells}."""
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        rows[cells[0]] = cells[1:]
    return rows


def read_csv(path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_two_norms_two_batch_sizes(small_sweep):
    report = write_report([small_sweep])
    rows = table_rows(report.table)
    assert report.table.splitlines()[0] == "| norm | bs 1 | bs 2 |"
    assert rows["batch"] == ["0.500 ± 0.100", "0.700 ± 0.100"]
    assert rows["group"] == ["0.800 ± 0.010", "0.810 ± 0.010"]
    results = read_csv(small_sweep / "results.csv")
    assert [(r["norm"], r["batch_size"]) for r in results] == [
        ("batch", "1"),
        ("batch", "2"),
        ("group", "1"),
        ("group", "2"),
    ]
    first = results[0]
    assert float(first["val_dice_mean"]) == pytest.approx(0.5)
    assert float(first["val_dice_std"]) == pytest.approx(0.1)
    assert float(first["val_dice_ci95_low"]) == pytest.approx(0.5 - 0.2484, abs=1e-4)
    assert float(first["val_dice_ci95_high"]) == pytest.approx(0.5 + 0.2484, abs=1e-4)
    assert first["n_seeds_completed"] == "3" and first["n_failed"] == "0"
    assert float(first["eval_batch_mean"]) == pytest.approx(
        0.6
    )  # the fixture's batch-stats eval = dice + 0.1
    assert float(first["mean_samples_per_s"]) == pytest.approx(10.0)
    assert results[2]["eval_batch_mean"] == ""  # group norm has no eval modes
    assert first["status"] == "3 completed"


def test_no_row_ranks_the_norms_and_the_reference_difference_is_tested(small_sweep):
    # No "highest mean" row: which norm is better is said only by a verdict.
    assert "highest mean" not in build_report([small_sweep]).markdown
    # With group as the reference, batch - group per seed: bs 1 -0.39, -0.30, -0.21 (mean -0.30, sd 0.09),
    # bs 2 -0.20, -0.11, -0.02. m = 2: the 97.5% interval is -0.30 +- t(0.9875, 2) 0.09/sqrt(3) = [-0.622, +0.022]:
    # it reaches past 0, so inconclusive.
    report = build_report([small_sweep], reference="group")
    assert "highest mean" not in report.markdown and "highest mean" not in report.table
    delta = report.analysis.conditions[0].delta("batch", 1)
    assert delta.verdict.value == "inconclusive"
    assert (delta.low, delta.high) == (pytest.approx(-0.622, abs=1e-3), pytest.approx(0.022, abs=1e-3))
    assert "ties" not in report.markdown and "tie:" not in report.markdown


def test_one_shared_seed_is_untestable(tmp_path, write_run):
    write_run(tmp_path, "batch", 1, 0, 0.5)
    write_run(tmp_path, "group", 1, 1, 0.8)
    report = build_report([tmp_path], reference="group")
    rows = table_rows(report.table)
    assert rows["group"] == ["0.800 (n=1/2)"]  # seeds 0 and 1 exist in the sweep, group has only one
    assert "-0.300 (untestable: 0 shared seeds)" in report.markdown
    assert (
        "`batch` minus `group`, same batch size and seed: untestable at bs 1 (0 shared seeds)."
        in report.markdown
    )


def test_eval_mode_rows_only_for_bn_family(small_sweep):
    report = build_report([small_sweep])
    labels = list(table_rows(report.table))
    assert labels == ["batch", "batch (precise BN)", "batch (batch stats)", "group"]
    assert table_rows(report.table)["batch (batch stats)"] == ["0.600 ± 0.100", "0.800 ± 0.100"]


def test_failed_run_in_table_and_report(small_sweep, write_run):
    write_run(small_sweep, "group", 2, 1, None, status="failed", error="CUDA out of memory (boom)")
    for seed in range(3):
        write_run(
            small_sweep, "instance", 1, seed, None, status="diverged", error=f"loss is NaN at step {seed}"
        )
    report = write_report([small_sweep])
    rows = table_rows(report.table)
    assert rows["group"][1] == "0.810 ± 0.014 (n=2/3; 1 failed)"
    assert rows["instance"] == ["diverged (3/3)", "—"]
    md = (small_sweep / "report.md").read_text()
    assert "CUDA out of memory (boom)" in md
    assert "loss is NaN at step 2" in md
    assert "4 run(s) have no result" in md
    results = {(r["norm"], r["batch_size"]): r for r in read_csv(small_sweep / "results.csv")}
    assert results[("group", "2")]["n_failed"] == "1"
    assert results[("instance", "1")]["n_seeds_completed"] == "0"
    assert results[("instance", "1")]["val_dice_mean"] == ""


def test_running_and_metricless_runs_are_not_dropped(tmp_path, write_run):
    write_run(tmp_path, "group", 1, 0, 0.8)
    write_run(tmp_path, "group", 1, 1, None, status="running")
    write_run(tmp_path, "group", 1, 2, None)  # "completed" without a val_dice: no result
    report = build_report([tmp_path])
    assert table_rows(report.table)["group"] == ["0.800 (n=1/3; 1 running; 1 failed)"]
    assert "Runs: 3 (1 completed, 1 failed, 1 running)" in report.markdown
    assert "'val_dice' is missing or not finite" in report.markdown


def test_missing_seed_shows_n(small_sweep):
    (small_sweep / "batch/bs2/seed1/metrics.json").unlink()
    rows = table_rows(build_report([small_sweep]).table)
    assert rows["batch"][1] == "0.700 ± 0.141 (n=2/3)"
    assert rows["batch"][0] == "0.500 ± 0.100"


def test_corrupt_metrics_json_is_reported(small_sweep):
    bad = small_sweep / "half_written" / "metrics.json"
    bad.parent.mkdir()
    bad.write_text('{"status": "completed", "norm": "ba')
    no_norm = small_sweep / "no_norm" / "metrics.json"
    no_norm.parent.mkdir()
    no_norm.write_text('{"status": "completed", "batch_size": 1, "seed": 0}')
    report = write_report([small_sweep])
    assert any(str(bad) in w and "invalid JSON" in w for w in report.warnings)
    assert any(str(no_norm) in w and "missing field 'norm'" in w for w in report.warnings)
    md = (small_sweep / "report.md").read_text()
    assert "## Unreadable metrics.json" in md and str(bad) in md
    assert "2 unreadable metrics.json" in md
    assert len(table_rows(report.table)) == 4  # the good runs are all there


def test_two_sweep_dirs_merge(tmp_path, write_run):
    first, second, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    for seed in range(2):
        write_run(first, "batch", 1, seed, 0.4 + 0.1 * seed)
        write_run(second, "group", 8, seed, 0.8, subdir=f"deep/er/{seed}")
    report = write_report([first, second], out_dir=out)
    rows = table_rows(report.table)
    assert rows["batch"] == ["0.450 ± 0.071", "—"]
    assert rows["group"] == ["—", "0.800 ± 0.000"]
    assert (out / "report.md").exists() and not (first / "report.md").exists()
    md = (out / "report.md").read_text()
    assert str(first) in md and str(second) in md


def test_duplicate_run_id_keeps_newest_completed(tmp_path, write_run):
    now = time.time()
    write_run(tmp_path, "group", 1, 0, 0.5, subdir="old", mtime=now - 300)
    write_run(tmp_path, "group", 1, 0, 0.9, subdir="new", mtime=now - 100)
    write_run(
        tmp_path, "group", 1, 0, None, subdir="newest_but_failed", mtime=now, status="failed", error="x"
    )
    report = write_report([tmp_path])
    assert table_rows(report.table)["group"] == ["0.900 (n=1)"]
    assert len(report.collection.runs) == 1
    assert any("appears 3 times" in w for w in report.warnings)
    assert len(read_csv(tmp_path / "runs.csv")) == 1


def test_overlapping_sweep_dirs_count_runs_once(small_sweep):
    collection = collect([small_sweep, small_sweep / "batch"])
    assert len(collection.runs) == 12


def test_runs_csv_has_flat_fields(small_sweep):
    write_report([small_sweep])
    runs = read_csv(small_sweep / "runs.csv")
    assert len(runs) == 12
    assert list(runs[0])[:3] == ["run_name", "run_id", "status"]
    assert {"eval_modes.precise", "val_dice_per_class.class1", "versions.torch", "path"} <= set(runs[0])


def test_pngs_are_valid(small_sweep):
    report = write_report([small_sweep])
    for name in ("dice_vs_batch_size.png", "bn_eval_gap.png"):
        path = small_sweep / name
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 0
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 100 and image.shape[1] > 100
        assert f"]({name})" in report.markdown


def test_no_bn_plot_without_bn_family(tmp_path, write_run):
    for seed in range(2):
        write_run(tmp_path, "group", 1, seed, 0.8)
        write_run(tmp_path, "instance", 1, seed, 0.7)
    report = write_report([tmp_path])
    assert not (tmp_path / "bn_eval_gap.png").exists()
    assert "bn_eval_gap.png" not in report.markdown
    assert (tmp_path / "dice_vs_batch_size.png").exists()


def test_reading_is_generated_from_numbers(small_sweep):
    md = build_report([small_sweep]).markdown
    # The fixture's batch-stats evaluation is running + 0.1 on every seed: no noise, so "better" everywhere.
    assert (
        "- `batch`, batch statistics minus running statistics (same weights): better at bs 1 (+0.100 [+0.100, +0.100]), 2 (+0.100 [+0.100, +0.100])."
        in md
    )
    assert "highest mean" not in md.lower()  # which norm is better is said only by a verdict
    assert "No `instance` runs: no difference to the reference was tested." in md
    assert "have no result" not in md  # the failure sentence only where runs failed (see test_failed_run...)


def test_different_models_are_separate_rows(tmp_path, write_run):
    write_run(tmp_path, "group", 1, 0, 0.8, model="unet")
    write_run(tmp_path, "group", 1, 0, 0.6, model="dynunet", run_id="other", subdir="dyn")
    labels = list(table_rows(build_report([tmp_path]).table))
    assert labels[:2] == ["group [model=dynunet]", "group [model=unet]"]


def test_custom_metric_and_unknown_metric(small_sweep):
    rows = table_rows(build_report([small_sweep], metric="best_val_dice").table)
    assert rows["group"][0] == "0.810 ± 0.010"
    with pytest.raises(UserError, match="metric 'nope' not found"):
        build_report([small_sweep], metric="nope")


def test_eval_mode_rows_are_in_the_tables_metric(tmp_path, write_run):
    """A mode row shows the table's metric in that mode: HD95 under --metric val_hd95 (not the mode's Dice),
    and no mode rows for a metric the modes are not scored in."""
    for seed, (hd95, batch_hd95) in enumerate([(6.0, 4.0), (8.0, 5.0), (10.0, 6.0)]):
        write_run(
            tmp_path,
            "batch",
            1,
            seed,
            0.7,
            val_hd95=hd95,
            eval_modes_hd95={"running": hd95, "precise": hd95 - 1.0, "batch": batch_hd95},
        )
    hd95 = table_rows(build_report([tmp_path], metric="val_hd95").table)
    assert hd95 == {
        "batch": ["8.000 ± 2.000"],
        "batch (precise BN)": ["7.000 ± 2.000"],
        "batch (batch stats)": ["5.000 ± 1.000"],
    }
    assert list(table_rows(build_report([tmp_path], metric="best_val_dice").table)) == ["batch"]
    dice = table_rows(build_report([tmp_path]).table)
    assert dice["batch (batch stats)"] == ["0.800 ± 0.000"]  # conftest: batch stats = val_dice + 0.1


def test_empty_or_missing_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no metrics.json found under"):
        write_report([tmp_path])
    with pytest.raises(UserError, match="sweep dir not found"):
        write_report([tmp_path / "nope"])


def test_sweep_where_nothing_completed(tmp_path, write_run, recwarn):
    write_run(tmp_path, "batch", 1, 0, None, status="failed", error="Expected more than 1 value per channel")
    write_run(tmp_path, "group", 2, 0, None, status="running")
    report = write_report([tmp_path])
    rows = table_rows(report.table)
    assert rows["batch"] == ["failed (1/1)", "—"]
    assert rows["group"] == ["—", "running (1/1)"]
    assert "Expected more than 1 value per channel" in report.markdown
    assert (tmp_path / "dice_vs_batch_size.png").exists()
    assert not [w for w in recwarn if "matplotlib" in str(w.filename)]


def test_same_seed_with_different_run_ids_keeps_one(tmp_path, write_run):
    write_run(tmp_path, "group", 1, 0, 0.5, subdir="a", run_id="aaa", mtime=time.time() - 60)
    write_run(tmp_path, "group", 1, 0, 0.9, subdir="b", run_id="bbb")
    report = build_report([tmp_path])
    assert table_rows(report.table)["group"] == ["0.900 (n=1)"]
    assert any("2 runs with different run_ids" in w for w in report.warnings)
    assert "## Notes" in report.markdown


def test_norm_options_split_rows_but_missing_fields_do_not(tmp_path, write_run):
    write_run(tmp_path, "group", 1, 0, 0.8, norm_options={"groups": 8}, history=[{"step": 1, "loss": 0.5}])
    write_run(tmp_path, "group", 1, 1, 0.7, norm_options={"groups": 16}, subdir="g16")
    write_run(tmp_path, "batch", 1, 0, 0.5, norm_options={"momentum": 0.1})
    # An early failure records only the basics: it must land in the batch row, not a row of its own.
    early = tmp_path / "early" / "metrics.json"
    early.parent.mkdir()
    early.write_text('{"status": "failed", "error": "boom", "norm": "batch", "batch_size": 1, "seed": 1}')
    report = write_report([tmp_path])
    rows = table_rows(report.table)
    assert rows["batch"] == ["0.500 (n=1/2; 1 failed)"]
    # Each variant was run at one seed: no result is missing from either row.
    assert rows["group [norm_options=groups=16]"] == ["0.700 (n=1)"]
    assert rows["group [norm_options=groups=8]"] == ["0.800 (n=1)"]
    runs = read_csv(tmp_path / "runs.csv")
    assert "history" not in runs[0] and "norm_options.groups" in runs[0]
