"""What the report refuses, splits and names, and how its files land: a batch-dependent reference, runs that
differ in more than the seed, gradient accumulation, the batch-statistics setting, concurrent writers and a
full disk."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import time

import pytest

from norm_experiments.norms import registry
from norm_experiments.report import build_report, plots
from norm_experiments.report.analysis import DEFAULT_REFERENCE
from norm_experiments.report.cli import main as report_main
from norm_experiments.report.publish import STAGING_PREFIX
from tests.helpers import assert_clean_failure
from tests.report.test_report_cli import run_cli
from tests.report.test_report_sweep import table_rows


def test_default_reference_is_the_registry_s_and_batch_independent() -> None:
    record = registry.report_reference()
    assert record.name == DEFAULT_REFERENCE and not record.batch_dependent


def test_a_batch_dependent_reference_is_refused_with_one_line(small_sweep) -> None:
    result = run_cli(str(small_sweep), "--reference", "batch")
    assert_clean_failure(result)
    assert result.stderr.strip().splitlines() == [
        "error: --reference batch: its runs record batch_dependent: true; the reference must be a "
        "batch-independent norm (default: instance)"
    ]
    assert not (small_sweep / "report.md").exists()
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("option", "line"),
    [
        (
            ["--reference", "gruop"],
            "error: --reference gruop: no run of these sweeps trained that norm (did you mean group?); "
            "their norms: batch, group",
        ),
        (
            ["--metric", "val_dcie"],
            "error: metric 'val_dcie' not found in any completed run (did you mean val_dice",
        ),
    ],
)
def test_a_typo_in_the_reference_or_the_metric_names_the_closest(small_sweep, capsys, option, line) -> None:
    """A reference no run trained used to give a report with no comparisons, exit 0."""
    yesterday = "# Normalization vs batch size: val_dice\n\nthe report of yesterday\n"
    (small_sweep / "report.md").write_text(yesterday)
    with pytest.raises(SystemExit) as stop:
        report_main([str(small_sweep), *option])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith(line) and err.count("\n") == 1, err
    assert (small_sweep / "report.md").read_text() == yesterday


def test_the_report_does_not_import_torch(small_sweep) -> None:
    code = (
        "import sys; from pathlib import Path; from norm_experiments.report import write_report; "
        f"write_report([Path({str(small_sweep)!r})]); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_accumulation_is_a_row_of_its_own(tmp_path, write_run) -> None:
    for seed in range(3):
        write_run(tmp_path, "batch", 1, seed, 0.3, subdir=f"plain/{seed}", run_id=f"plain{seed}")
        write_run(
            tmp_path, "batch", 1, seed, 0.5, subdir=f"acc/{seed}", run_id=f"acc{seed}", accumulate_steps=4
        )
    report = build_report([tmp_path])
    rows = table_rows(report.table)
    assert rows["batch"] == ["0.300 ± 0.000"]
    assert rows["batch [accumulate 4]"] == ["0.500 ± 0.000"]
    assert rows["batch [accumulate 4] (batch stats)"] == ["0.600 ± 0.000"]
    assert "the optimizer steps every k micro-batches" in report.markdown


def test_runs_that_differ_in_more_than_the_seed_are_split_and_named(tmp_path, write_run) -> None:
    for seed, budget in enumerate((1200, 1200, 2400)):
        write_run(tmp_path, "group", 1, seed, 0.6 + 0.1 * (budget > 1200), samples_budget=budget)
    report = build_report([tmp_path])
    rows = table_rows(report.table)
    # Each row expects the seeds run with its setting: seed 2 is no missing result of the 1200 row.
    assert rows["group [samples_budget=1200]"] == ["0.600 ± 0.000"]
    assert rows["group [samples_budget=2400]"] == ["0.700 (n=1)"]
    assert (
        "group bs=1: runs differ in samples_budget (1200; 2400): split into rows, never averaged"
        in report.markdown
    )


@pytest.mark.parametrize(
    ("windows", "expected"),
    [
        (1, "batch stats = each window alone, normalized with its own statistics (batch_stats_windows = 1)"),
        (4, "batch stats = 4 sliding windows of one validation volume per forward"),
    ],
)
def test_batch_statistics_evaluation_is_named(tmp_path, write_run, windows, expected) -> None:
    for seed in range(2):
        write_run(tmp_path, "batch", 1, seed, 0.5 + 0.01 * seed, batch_stats_windows=windows)
    assert expected in build_report([tmp_path]).markdown


def _staged_report(out) -> bool:
    return any((d / "report.md").exists() for d in out.glob(f"{STAGING_PREFIX}*"))


def test_a_second_writer_waits_for_the_lock(small_sweep, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another report is moving its files in
    cmd = [sys.executable, "-m", "norm_experiments.report.cli", str(small_sweep), "--out", str(out)]
    writer = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while not _staged_report(out) and time.time() < deadline:
            time.sleep(0.1)
        assert _staged_report(out), "the writer never finished staging"
        time.sleep(0.5)
        assert sorted(p.name for p in out.iterdir() if not p.name.startswith(STAGING_PREFIX)) == []
    finally:
        os.close(fd)
    _, stderr = writer.communicate(timeout=60)
    assert writer.returncode == 0, stderr
    assert {"report.md", "results.csv", "runs.csv", "bn_eval_gap.png"} <= {p.name for p in out.iterdir()}
    assert not list(out.glob(f"{STAGING_PREFIX}*"))


def test_two_concurrent_reports_never_mix(tmp_path, write_run) -> None:
    first, second, out = tmp_path / "first", tmp_path / "second", tmp_path / "out"
    for seed in range(2):
        write_run(first, "group", 1, seed, 0.8)
        write_run(second, "instance", 2, seed, 0.7)
    cmds = [
        [sys.executable, "-m", "norm_experiments.report.cli", str(d), "--out", str(out)]
        for d in (first, second)
    ]
    writers = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in cmds]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    winner = first if f"`{first}`" in (out / "report.md").read_text() else second
    runs = (out / "runs.csv").read_text()
    assert str(winner) in runs and str(second if winner == first else first) not in runs
    assert ("group" in (out / "results.csv").read_text()) == (winner == first)


def test_a_full_disk_leaves_the_previous_report(small_sweep, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "out"
    report_main([str(small_sweep), "--out", str(out)])
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(analysis, path):
        path.write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(plots, "plot_bn_eval_gap", full_disk)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        report_main([str(small_sweep), "--out", str(out), "--reference", "group"])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: cannot write the report: ") and line.endswith(": No space left on device")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing new, nothing half-written


def test_a_report_killed_among_its_renames_leaves_no_document_of_the_old_report(
    small_sweep, tmp_path, monkeypatch
) -> None:
    """The renames are one per file: killed among them, a report left results.csv of the new report beside
    report.md of the old one, nothing marking it stale. The old documents are removed first, the new ones renamed
    last: such a folder has no document until the report is run again."""
    publish = sys.modules["norm_experiments.report.publish"]  # the module (the package exports its function)
    out = tmp_path / "out"
    report_main([str(small_sweep), "--out", str(out)])
    renamed, real = [], os.replace

    def killed_after_two(src, dst):
        if len(renamed) == 2:
            raise KeyboardInterrupt  # the process dies here
        renamed.append(dst)
        real(src, dst)

    monkeypatch.setattr(publish.os, "replace", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        report_main([str(small_sweep), "--out", str(out), "--reference", "group"])
    monkeypatch.undo()
    names = {p.name for p in out.iterdir()}
    assert "results.csv" in names and not {"report.md", "report.html"} & names
    report_main([str(small_sweep), "--out", str(out), "--reference", "group"])  # run again: whole again
    assert {"report.md", "report.html", "results.csv"} <= {p.name for p in out.iterdir()}


def test_a_killed_reports_staging_folder_is_removed_by_the_next_report(small_sweep, tmp_path) -> None:
    """Each report killed while writing left its staging folder (copies of the report and plots) for good."""
    out = tmp_path / "out"
    out.mkdir()
    abandoned, fresh, live = (out / f"{STAGING_PREFIX}{name}" for name in ("killed", "fresh", "live"))
    for folder in (abandoned, fresh, live):
        folder.mkdir()
        (folder / "report.md").write_text("old")
    an_hour_ago = time.time() - 3600
    for folder in (abandoned, live):
        os.utime(folder, (an_hour_ago, an_hour_ago))
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another report is still writing into it
    try:
        report_main([str(small_sweep), "--out", str(out)])
    finally:
        os.close(fd)
    assert not abandoned.exists() and fresh.exists() and live.exists()


def test_a_reference_split_by_a_setting_is_named_not_called_missing(tmp_path, write_run) -> None:
    """Two sweeps of other budgets merged: the reference's runs are split into rows, and the reading says so."""
    for seed in range(2):
        for norm in ("batch", "instance"):
            write_run(tmp_path / "a", norm, 1, seed, 0.6, samples_budget=16, run_id=f"a{norm}{seed}")
            write_run(tmp_path / "b", norm, 1, seed, 0.7, samples_budget=320, run_id=f"b{norm}{seed}")
    write_run(tmp_path / "a", "instance", 1, 2, 0.6, samples_budget=16, run_id="ainstance2")
    report = build_report([tmp_path / "a", tmp_path / "b"])
    assert "No `instance` runs" not in report.markdown
    assert (
        "The `instance` runs differ in more than the seed, so they are split into 2 rows (instance "
        "[samples_budget=16], instance [samples_budget=320]) and none of them is the reference"
        in report.markdown
    )
    rows = table_rows(report.table)
    assert rows["instance [samples_budget=320]"] == ["0.700 ± 0.000"]  # seeds 0-1 run, none missing
    # A plain row beside them expects the seeds of the plain rows, not the split rows' seeds.
    plain = tmp_path / "c"
    for seed in range(2):
        write_run(plain, "batch", 1, seed, 0.5, run_id=f"c{seed}")
    for seed in range(5):
        write_run(plain, "group", 1, seed, 0.6, samples_budget=999, run_id=f"g{seed}")
        write_run(plain, "group", 1, seed, 0.7, samples_budget=111, subdir=f"g111/{seed}", run_id=f"h{seed}")
    assert table_rows(build_report([plain]).table)["batch"] == ["0.500 ± 0.000"]
    assert rows["batch [samples_budget=16]"] == ["0.600 ± 0.000 (n=2/3)"]  # seed 2 ran for instance only


def test_unequal_seed_counts_in_a_grid_are_not_explained_by_a_study(tmp_path, write_run) -> None:
    for seed in range(3):
        for norm in ("batch", "instance"):
            if (norm, seed) != ("instance", 2):
                write_run(tmp_path, norm, 1, seed, 0.6 + 0.01 * seed)
    markdown = build_report([tmp_path]).markdown
    assert "a study stops running a cell" not in markdown
    assert "n = 2 to 3 seeds per cell (seeds 0-2; `n=k/m` marks the cells with fewer seeds" in markdown


def test_hd95_verdicts_are_read_with_lower_is_better(tmp_path, write_run) -> None:
    for seed in range(3):
        write_run(tmp_path, "batch", 1, seed, 0.7, val_hd95=5.0 + seed)
        write_run(tmp_path, "instance", 1, seed, 0.7, val_hd95=25.0 + seed + 0.1 * seed**2)
    markdown = build_report([tmp_path], metric="val_hd95").markdown
    assert "better / worse = entirely below / above 0 (lower is better)" in markdown
    (method,) = [line for line in markdown.splitlines() if line.startswith("Each norm minus instance")]
    assert "better / worse = entirely below / above 0 (lower is better)" in method
    (gap,) = [
        line for line in markdown.splitlines() if line.startswith("Batch statistics (and PreciseBN) minus")
    ]
    assert "better / worse = entirely above / below 0;" in gap  # the gap compares Dice: higher is better


def test_a_run_whose_process_has_ended_is_stopped_not_running(tmp_path, write_run) -> None:
    """kill -9 leaves a record saying running; its folder's lock names the process, which is gone."""
    import socket

    for seed in range(2):
        write_run(tmp_path, "batch", 1, seed, 0.6)
    killed = write_run(tmp_path, "group", 1, 0, None, status="running").parent
    alive = write_run(tmp_path, "group", 1, 1, None, status="running").parent
    other = write_run(tmp_path, "group", 1, 2, None, status="running").parent
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a process id that has just ended
    host = socket.gethostname()
    (killed / ".lock").write_text(f"process {child.pid} on {host}\n")
    (alive / ".lock").write_text(f"process {os.getpid()} on {host}\n")
    (other / ".lock").write_text(f"process {child.pid} on another-machine\n")  # cannot tell: running
    markdown = build_report([tmp_path]).markdown
    assert "1 stopped, 2 running" in markdown
    assert (
        f"its record says running, but process {child.pid} on {host}, which held its folder, has ended (killed?)"
        in markdown
    )
