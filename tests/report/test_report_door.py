"""The report's door (issue #32): every number a run record gives is checked before it is used, a bad record
is named and left out (not a traceback), seeds that scored different cases get the right reason, the
end-of-sweep report cannot fail silently inside Hydra's callback, a bad multirun.yaml is one line, a full disk
names the file, a closed pipe ends quietly; and randomly corrupted records never crash the report."""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hydra._internal.callbacks import Callbacks
from omegaconf import OmegaConf

from norm_experiments import run_record, safe_io
from norm_experiments.report import build_report, plots, schema
from norm_experiments.report.cli import main as report_main
from norm_experiments.report.collect import collect
from norm_experiments.report.model import DIFFERENT_CASES, NO_CASE_SCORES
from norm_experiments.sweep.callback import STALE_COPY, STALE_MARK, SweepReport
from tests.helpers import fill
from tests.report.conftest import make_metrics, per_case
from tests.report.test_report_sweep import table_rows

# small_sweep's table (conftest): what the report shows when every bad record is left out.
CLEAN_ROWS = {
    "batch": ["0.500 ± 0.100", "0.700 ± 0.100"],
    "group": ["0.800 ± 0.010", "0.810 ± 0.010"],
}


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    """norm-exp-report's main, in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        report_main(args)
        code = 0
    except SystemExit as exit_info:
        code = 0 if exit_info.code is None else int(exit_info.code)  # type: ignore[arg-type]
    out, err = capsys.readouterr()
    return code, out, err


def write_record(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / run_record.FILENAME
    path.write_text(text)
    return path


def extra_run(**overrides) -> dict:
    """A fourth seed of small_sweep's group bs=1 cell, with per-case scores; overrides break it on purpose."""
    data = make_metrics(
        "group", 1, 3, 0.81, run_id="extra", per_case=per_case({"running": {"case_a": 0.8, "case_b": 0.82}})
    )
    data.update(overrides)
    return data


def with_case(**entry) -> dict:
    """extra_run with per_case.running.case_a replaced by `entry`'s value ('entry' key) or fields."""
    data = extra_run()
    data["per_case"]["running"]["case_a"] = entry.get(
        "entry", {**data["per_case"]["running"]["case_a"], **entry}
    )
    return data


def with_text(data: dict, old: str, new: str) -> str:
    text = json.dumps(data)
    assert old in text
    return text.replace(old, new, 1)


# (record text, what the note says): each record is refused as a whole, with the field named.
BAD_RECORDS: dict[str, tuple[str, str]] = {
    "Dice below 0": (json.dumps(extra_run(val_dice=-0.2)), "val_dice = -0.2 is outside [0, 1] (a Dice)"),
    "Dice above 1": (json.dumps(extra_run(val_dice=1.5)), "val_dice = 1.5 is outside [0, 1] (a Dice)"),
    "Dice 1e308": (json.dumps(extra_run(val_dice=1e308)), "val_dice = 1e+308 is outside [0, 1]"),
    "Dice Infinity": (json.dumps(extra_run(val_dice=math.inf)), "val_dice = inf is outside [0, 1]"),
    "Dice 1e999": (
        with_text(extra_run(), '"val_dice": 0.81', '"val_dice": 1e999'),
        "val_dice = inf is outside",
    ),
    "memory 1e308": (json.dumps(extra_run(peak_memory_mb=1e308)), "peak_memory_mb = 1e+308 is outside"),
    "a 99-digit speed": (json.dumps(extra_run(samples_per_s=10**98)), "samples_per_s = 1000"),
    "an unknown field 1e300": (json.dumps(extra_run(extra={"x": [1e300]})), "extra.x[0] = 1e+300: no number"),
    "negative HD95": (
        json.dumps(extra_run(val_hd95=-1.0)),
        "val_hd95 = -1.0 is outside [0, 1e+15] (a distance",
    ),
    "per-case entry a list": (
        json.dumps(with_case(entry=[0.5])),
        "per_case.running.case_a is a list, not an object",
    ),
    "per-case Dice a list": (json.dumps(with_case(dice=[0.5])), "per_case.running.case_a.dice is a list"),
    "per-case Dice 1.2": (
        json.dumps(with_case(dice={"fg": 1.2})),
        "per_case.running.case_a.dice.fg = 1.2 is outside",
    ),
    "per-case Dice NaN": (
        json.dumps(with_case(dice={"fg": math.nan})),
        "case_a.dice.fg is NaN where a number",
    ),
    "per-case HD95 -1": (
        json.dumps(with_case(hd95={"fg": -1})),
        "per_case.running.case_a.hd95.fg = -1 is outside",
    ),
    "per-case errors a string": (
        json.dumps(with_case(errors={"fp_ml": "1"})),
        "case_a.errors.fp_ml is '1', not",
    ),
    "an eval mode a string": (
        json.dumps(extra_run(eval_modes={"batch": "0.8"})),
        "eval_modes.batch is '0.8', not",
    ),
    "windows a list": (
        json.dumps(extra_run(batch_stats_windows=[4])),
        "batch_stats_windows is a list, not an integer",
    ),
    "spacing a string": (
        json.dumps(extra_run(preprocessing={"target_spacing": ["a"]})),
        "preprocessing.target_spacing[0] is 'a', not a number",
    ),
    "norm a number": (json.dumps(extra_run(norm=5)), "norm is 5, not a name"),
    "norm two lines": (json.dumps(extra_run(norm="group\n| fake | row |")), "is not a one-line name"),
    "status unknown": (
        json.dumps(extra_run(status="done")),
        "status is 'done', not one of running, completed",
    ),
    "seed a string": (json.dumps(extra_run(seed="3")), "seed is '3', not an integer"),
    "bn_family a string": (json.dumps(extra_run(bn_family="yes")), "bn_family is 'yes', not true or false"),
    "duplicate key": (
        with_text(extra_run(), '"val_dice": 0.81', '"val_dice": 0.1, "val_dice": 0.81'),
        "the key 'val_dice' appears twice in one object",
    ),
    "nested 100 deep": (
        json.dumps(extra_run(history=[])).replace('"history": []', '"history": ' + "[" * 100 + "]" * 100),
        "refused, nested 101 levels deep (at most 64)",
    ),
}


@pytest.mark.parametrize("name", BAD_RECORDS)
def test_a_bad_record_is_named_and_left_out(name: str, small_sweep: Path) -> None:
    """The door itself (collect); the CLI test below shows the same notes in report.md and on stderr."""
    text, reason = BAD_RECORDS[name]
    bad = write_record(small_sweep / "extra", text)
    found = collect([small_sweep])
    ((path, why),) = found.unreadable
    assert path == bad and reason in why and "\n" not in why, why
    assert len(found.runs) == 12 and bad not in [r.path for r in found.runs]  # small_sweep's runs, not it


def test_nan_is_no_score_where_training_writes_it(small_sweep: Path) -> None:
    """A completed run whose classes were all absent records val_dice NaN: a run without a result, kept."""
    path = write_record(small_sweep / "extra", json.dumps(extra_run(val_dice=math.nan, per_case=None)))
    report = build_report([small_sweep])
    assert report.collection.unreadable == []
    assert path in [r.path for r in report.collection.runs]
    assert "'val_dice' is missing or not finite" in report.markdown


def test_the_cli_names_bad_records_and_plots_what_is_left(small_sweep: Path, tmp_path: Path, capsys) -> None:
    """The real entry point: a Dice of 1.5 alone in its cell (which broke the error bars: 'yerr' must not
    contain negative values) and a per-case list; exit 0, one warning line each, report.md lists them."""
    alone = write_record(
        small_sweep / "alone", json.dumps(make_metrics("instance", 1, 0, 1.5, best_val_dice=0.9))
    )
    listed = write_record(small_sweep / "listed", json.dumps(with_case(entry=[0.5])))
    out = tmp_path / "out"
    code, stdout, stderr = run_main([str(small_sweep), "--out", str(out)], capsys)
    assert code == 0, stderr
    lines = stderr.strip().splitlines()
    assert sorted(line.split(" (")[0] for line in lines) == [
        f"warning: unreadable metrics.json: {alone}",
        f"warning: unreadable metrics.json: {listed}",
    ]
    rows = table_rows(stdout.split("\n\nwrote")[0])
    assert {row: rows[row] for row in CLEAN_ROWS} == CLEAN_ROWS and "instance" not in rows
    markdown = (out / "report.md").read_text()
    assert "## Unreadable metrics.json" in markdown and f"`{alone}`: val_dice = 1.5" in markdown
    assert (out / "dice_vs_batch_size.png").stat().st_size > 0


def test_duplicate_json_keys_are_refused_at_any_depth() -> None:
    assert safe_io.parse_json('{"a": {"b": 1, "c": 2}, "d": 3}', "x.json") == {"a": {"b": 1, "c": 2}, "d": 3}
    for text, key in (('{"a": 1, "a": 1}', "a"), ('{"a": [{"b": 1, "b": 2}]}', "b")):
        with pytest.raises(safe_io.UnsafeFile, match=f"x.json: refused, the key '{key}' appears twice"):
            safe_io.parse_json(text, "x.json")


def test_the_schema_covers_every_field_of_the_record() -> None:
    """A field added to RunRecord must get its rule here (else it would pass unchecked)."""
    assert tuple(schema.COORDINATES) == run_record.COORDINATES
    assert set(schema.COORDINATES) | set(schema.FIELDS) == run_record.FIELDS


def test_records_that_training_writes_pass_the_door(write_cases, tmp_path: Path) -> None:
    """A complete record with every optional block (conftest builds it with RunRecord) passes unchanged."""
    write_cases(tmp_path, "batch", 2, [[0.7, 0.72, 0.68, 0.8]] * 2, batch=[[0.8, 0.8, 0.8, 0.8]] * 2)
    report = build_report([tmp_path])
    assert report.collection.unreadable == [] and len(report.collection.runs) == 2


# ------------------------------------------------------------------------------ seeds that scored other cases


def write_seeds(sweep: Path, cases_of_seed: Callable[[int], list[str]], with_cases: bool = True) -> None:
    """group and instance (the reference), bs 1, 3 seeds; each seed scored cases_of_seed(seed)."""
    for norm, base in (("group", 0.7), ("instance", 0.68)):
        for seed in range(3):
            scores = {case: base + 0.01 * seed + 0.002 * i for i, case in enumerate(cases_of_seed(seed))}
            extra = {"per_case": per_case({"running": scores})} if with_cases else {}
            data = make_metrics(norm, 1, seed, sum(scores.values()) / len(scores), **extra)
            write_record(sweep / f"{norm}-{seed}", json.dumps(data))


def reference_method(markdown: str) -> str:
    """The method line of the table of differences to the reference."""
    (line,) = [line for line in markdown.splitlines() if line.startswith("Each norm minus")]
    return line


def test_seeds_that_scored_different_cases_are_said_so(tmp_path: Path) -> None:
    """Issue #32: every seed scored its own 4 cases; the report said 'records without per-case scores'."""
    write_seeds(tmp_path, lambda seed: [f"seed{seed}-case{i}" for i in range(4)])
    report = build_report([tmp_path])
    method = reference_method(report.markdown)
    assert f"(§: {DIFFERENT_CASES})" in method and NO_CASE_SCORES not in method
    (note,) = [n for n in report.collection.warnings if "different validation cases" in n]
    assert "3 different sets of cases among 6 runs, 0 case(s) scored by all of them" in note
    assert note in report.markdown


def test_records_without_per_case_scores_keep_their_reason(tmp_path: Path) -> None:
    write_seeds(tmp_path, lambda seed: ["a", "b"], with_cases=False)
    report = build_report([tmp_path])
    assert f"(§: {NO_CASE_SCORES})" in reference_method(report.markdown)
    assert not [n for n in report.collection.warnings if "different validation cases" in n]


def test_seeds_sharing_some_cases_use_those_and_say_so(tmp_path: Path) -> None:
    """Seeds with 3 of 4 cases in common: the crossed model over the 3 (no §), and a note."""
    write_seeds(tmp_path, lambda seed: ["a", "b", "c", f"own{seed}"])
    report = build_report([tmp_path])
    comparison = report.analysis.conditions[0].deltas.comparisons[0]
    assert comparison.estimate is not None and comparison.estimate.n_cases == 3
    assert "§" not in reference_method(report.markdown)
    assert any("1 case(s)" not in n and "3 case(s) scored by all" in n for n in report.collection.warnings)


# ------------------------------------------------------------------------------------- the end-of-sweep report


def end_of_sweep(sweep: Path) -> None:
    """What Hydra does at the end of a multirun: our callback inside its catch-all (Callbacks._notify)."""
    callbacks = Callbacks()
    callbacks.callbacks.append(SweepReport())
    callbacks.on_multirun_end(config=OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))


def test_a_failing_end_of_sweep_report_exits_2_and_marks_the_old_report_stale(
    small_sweep: Path, capsys
) -> None:
    end_of_sweep(small_sweep)
    old = (small_sweep / "report.md").read_text()
    assert not old.startswith(STALE_MARK)
    for path in small_sweep.rglob(run_record.FILENAME):  # a crafted record in every run folder
        path.write_text(json.dumps(make_metrics("group", 1, 0, 0.7, per_case={"running": {"c": [1]}})))
    for _ in range(2):  # twice: one stale line, not two
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            end_of_sweep(small_sweep)
        assert exit_info.value.code == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("error: end-of-sweep report failed: no readable metrics.json: ")
        assert line.endswith(f"the previous {small_sweep / 'report.md'} is marked stale in its first line")
        first, blank, *rest = (small_sweep / "report.md").read_text().splitlines(keepends=True)
        assert first.startswith(STALE_MARK) and "per_case.running.c is a list" in first and blank == "\n"
        assert "".join(rest) == old


def test_an_end_of_sweep_report_without_runs_exits_2(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        end_of_sweep(tmp_path)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: end-of-sweep report failed: no metrics.json found under {tmp_path}; no earlier report.md was "
        "there"
    ]
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- multirun.yaml


def alias_bomb(levels: int) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


MULTIRUN_YAML = {
    "malformed": ("hydra: [overrides\n", "not valid YAML"),
    "wrongly typed": ("hydra: 5\n", "not a multirun.yaml as Hydra writes it (no hydra.overrides.task)"),
    "task not a list": ("hydra:\n  overrides:\n    task: norm=batch\n", "hydra.overrides.task is not a list"),
    "3,000 deep": ("hydra: " + "[" * 3000 + "]" * 3000 + "\n", "multirun.yaml: "),
    "alias bomb": (alias_bomb(5), "refused, it expands to more than"),
}


@pytest.mark.parametrize("name", MULTIRUN_YAML)
def test_a_bad_multirun_yaml_is_one_line(name: str, small_sweep: Path, tmp_path: Path, capsys) -> None:
    text, reason = MULTIRUN_YAML[name]
    (small_sweep / "multirun.yaml").write_text(text)
    doc = tmp_path / "docs" / "results.md"
    code, _, stderr = run_main([str(small_sweep), "--doc", str(doc)], capsys)
    assert code == 2
    (line,) = stderr.strip().splitlines()
    assert line.startswith(f"error: {small_sweep / 'multirun.yaml'}: ") and reason in line, line
    assert not doc.exists()


def test_a_hydra_multirun_yaml_names_the_sweep_command(small_sweep: Path, tmp_path: Path, capsys) -> None:
    config = {"hydra": {"overrides": {"task": ["norm=batch,group", "seed=0,1,2"]}}, "seed": 0}
    OmegaConf.save(OmegaConf.create(config), small_sweep / "multirun.yaml")
    doc = tmp_path / "results.md"
    code, _, stderr = run_main([str(small_sweep), "--doc", str(doc)], capsys)
    assert code == 0, stderr
    assert "Runs made by `norm-exp-train norm=batch,group seed=0,1,2`" in doc.read_text()


@pytest.mark.parametrize("suffix", [".md", ".html"])
def test_doc_never_replaces_a_file_the_report_did_not_write(
    suffix: str, small_sweep: Path, tmp_path: Path, capsys
) -> None:
    """`--doc notes.md` replaced the user's notes.md (and notes.html) with the report; a report of ours is
    still written over, as `--doc docs/results.md` regenerates the project's own."""
    doc = tmp_path / "notes.md"
    theirs = doc.with_suffix(suffix)
    theirs.write_text("my notes\n")
    code, _, stderr = run_main([str(small_sweep), "--doc", str(doc)], capsys)
    assert code == 2 and stderr.strip() == (
        f"error: --doc {doc}: {theirs} exists and was not written by norm-exp-report; the report would "
        "replace it: choose another file, or move it away"
    )
    assert theirs.read_text() == "my notes\n" and not (tmp_path / "notes").exists()

    theirs.unlink()
    assert run_main([str(small_sweep), "--doc", str(doc)], capsys)[0] == 0
    first = doc.read_text()
    assert run_main([str(small_sweep), "--doc", str(doc)], capsys)[0] == 0  # ours: written again

    def body(text: str) -> list[str]:  # but the line with the time it was written
        return [line for line in text.splitlines() if not line.startswith("- Written by")]

    assert body(doc.read_text()) == body(first) and doc.with_suffix(".html").exists()


def test_out_and_docs_folder_never_replace_files_the_report_did_not_write(
    small_sweep: Path, tmp_path: Path, capsys
) -> None:
    """`--out DIR` replaced the user's own DIR/report.md and results.csv, and `--doc d/r.md` the user's
    d/r/results.csv: refused now, and kept; the report's own files there are replaced as before."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("report.md", "results.csv"):
        (out / name).write_text("mine\n")
    code, _, stderr = run_main([str(small_sweep), "--out", str(out)], capsys)
    assert code == 2 and stderr.strip() == (
        f"error: --out {out}: {out / 'results.csv'} exists and was not written by norm-exp-report; the report "
        "would replace it: choose another folder (--out DIR), or move it away"
    )
    assert [(out / n).read_text() for n in ("report.md", "results.csv")] == ["mine\n", "mine\n"]
    (out / "results.csv").unlink()
    (out / "report.md").unlink()
    assert run_main([str(small_sweep), "--out", str(out)], capsys)[0] == 0
    assert run_main([str(small_sweep), "--out", str(out)], capsys)[0] == 0  # its own files: replaced
    assert "results.csv" in json.loads((out / ".norm-exp-report.json").read_text())
    (out / ".norm-exp-report.json").unlink()  # a folder an older norm-exp-report wrote: its report.md vouches
    assert run_main([str(small_sweep), "--out", str(out)], capsys)[0] == 0

    doc = tmp_path / "d" / "r.md"
    (doc.parent / "r").mkdir(parents=True)
    (doc.parent / "r" / "runs.csv").write_text("mine\n")
    code, _, stderr = run_main([str(small_sweep), "--doc", str(doc)], capsys)
    assert code == 2 and f"--doc {doc}: {doc.parent / 'r' / 'runs.csv'} exists and was not written" in stderr
    assert (doc.parent / "r" / "runs.csv").read_text() == "mine\n" and not doc.exists()
    # The sweep's own folder is the report's home: written there as always.
    assert run_main([str(small_sweep)], capsys)[0] == 0 and (small_sweep / "report.md").exists()
    # By default the report goes into the first SWEEP_DIR, which may be any folder above sweeps: a folder of
    # the user's (no multirun.yaml) keeps its own results.csv.
    papers = tmp_path / "papers"
    shutil.copytree(small_sweep, papers / "sweep")
    (papers / "results.csv").write_text("mine\n")
    code, _, stderr = run_main([str(papers)], capsys)
    assert (
        code == 2 and f"{papers} is no sweep's folder (no multirun.yaml): {papers / 'results.csv'}" in stderr
    )
    assert (papers / "results.csv").read_text() == "mine\n"


# --------------------------------------------------------------------------------- full disks, closed pipes


def test_a_full_disk_names_the_file_and_the_sweep_report_goes_stale(small_sweep: Path, tmpfs, capsys) -> None:
    disk = tmpfs(512)
    sweep = disk / "sweep"
    for path in small_sweep.rglob(run_record.FILENAME):
        write_record(sweep / path.parent.relative_to(small_sweep), path.read_text())
    end_of_sweep(sweep)  # a first report, then the disk fills up
    old = (sweep / "report.md").read_text()
    fill(disk)
    code, _, stderr = run_main([str(sweep), "--out", str(disk / "out")], capsys)
    assert code == 2
    (line,) = stderr.strip().splitlines()
    assert line == f"error: cannot write the report: {disk / 'out'}: ENOSPC: No space left on device" or (
        line.startswith(f"error: cannot write the report: {disk / 'out'}/")
        and line.endswith(": ENOSPC: No space left on device")
    ), line
    assert "None" not in line
    # The end-of-sweep report on the full disk: exit 2, and report.md, which cannot take a note, is renamed.
    with pytest.raises(SystemExit) as exit_info:
        end_of_sweep(sweep)
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "ENOSPC" in line and "None" not in line
    assert line.endswith(f"the previous report.md is renamed {sweep / STALE_COPY}")
    assert (sweep / STALE_COPY).read_text() == old and not (sweep / "report.md").exists()


def test_a_full_disk_names_the_file_being_written(small_sweep: Path, tmpfs, capsys) -> None:
    """Room for the staging folder, not for the files: the write or close that fails carries no name."""
    disk = tmpfs(64)
    (disk / "out").mkdir()
    fill(disk)
    code, _, stderr = run_main([str(small_sweep), "--out", str(disk / "out")], capsys)
    assert code == 2
    (line,) = stderr.strip().splitlines()
    assert (
        line
        == f"error: cannot write the report: {disk / 'out' / 'results.csv'}: ENOSPC: No space left on device"
    )


def test_a_closed_pipe_ends_quietly(small_sweep: Path, tmp_path: Path) -> None:
    """`norm-exp-report ... | true`: the reader has gone; the report is written, nothing to say, exit 0."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "norm_experiments.report.cli", str(small_sweep), "--out", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # type: ignore[union-attr]
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and err == "", err
    assert (out / "report.md").is_file()


# --------------------------------------------------------------------------------------- the property test

HOSTILE: list[Any] = [
    None, True, False, 0, -1, 0.5, 1.5, -0.5, 1e308, -1e308, math.nan, math.inf, -math.inf, 10**30, 2**63,
    "", "0.5", "x" * 5000, [], {}, [0.5, 0.6], {"a": 1}, [[[[1]]]], {"fg": [1]}, {"fg": {"x": 1}},
    list(range(3000)), {f"k{i}": i for i in range(300)},
]  # fmt: skip


def _paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every path (tuple of keys and indices) to a value inside `value`, containers included."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value[:5]):
            yield from _paths(item, (*prefix, index))


def _set(data: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return data


def _delete(data: Any, path: tuple) -> None:
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]


def base_record(
    rng: random.Random, seed: int, norm: str | None = None, batch_size: int | None = None
) -> dict:
    """A complete record with every block the report reads (per-case scores and errors in two modes,
    convergence, preprocessing, GroupNorm layers, history)."""
    norm, bs = norm or rng.choice(["batch", "instance"]), batch_size or rng.choice([1, 2])
    scores = {f"case{i}": rng.uniform(0.5, 0.9) for i in range(3)}
    data = make_metrics(
        norm,
        bs,
        seed,
        sum(scores.values()) / 3,
        run_id=f"run-{norm}-{bs}-{seed}",
        val_hd95=4.0,
        per_case=per_case({"running": scores, "batch": scores}),
        convergence={"still_improving": rng.random() < 0.5, "metric": "train_loss", "slope": -0.1},
        preprocessing={
            "intensity": "zscore",
            "channel_intensity": ["zscore"],
            "target_spacing": [1.0, 1.0, 1.5],
        },
        group_layers={"layers": 10, "groups": [4, 4], "channels_per_group": [2, 8]},
        history=[{"step": 10, "samples_seen": 20, "val_dice": 0.5}],
    )
    for mode in ("running", "batch"):
        for case in data["per_case"][mode].values():
            case["errors"] = {"fp_ml": rng.uniform(0, 5), "fn_ml": 1.0, "fp_components": 2.0}
    return data


def mutate(rng: random.Random, data: dict) -> str:
    """One random corruption of a record's values, types, nesting or size, as the file's text."""
    kind = rng.choice(["value", "value", "value", "delete", "wrap", "text"])
    path = rng.choice(list(_paths(data))[1:])
    if kind == "value":
        _set(data, path, copy.deepcopy(rng.choice(HOSTILE)))
    elif kind == "delete":
        _delete(data, path)
    elif kind == "wrap":  # one more level of nesting, or a container's values as a list
        value = copy.deepcopy(_get(data, path))
        _set(data, path, list(value.values()) if isinstance(value, dict) else [value])
    text = json.dumps(data)
    if kind == "text":
        edits = [
            lambda t: t[: rng.randrange(len(t))],  # truncated
            lambda t: t.replace('"val_dice": ', '"val_dice": 1e999, "val_dice": ', 1),  # Infinity, duplicated
            lambda t: t.replace("0.", "-0.", 1),
            lambda t: t.replace('"seed": ', '"seed": 1' + "0" * 99 + ', "x": ', 1),
            lambda t: t.replace("[", "[" * 70, 1).replace("]", "]" * 70, 1),
            lambda t: t.replace('"norm": "', '"norm": "\\u0000', 1),
        ]
        text = rng.choice(edits)(text)
    return text


def _get(data: Any, path: tuple) -> Any:
    for key in path:
        data = data[key]
    return data


def test_randomly_corrupted_records_never_crash_the_report(tmp_path: Path, capsys) -> None:
    """200 seeded corruptions, 50 per report beside 12 sound runs, under several metrics and references (norms
    the sound runs trained): never a traceback; exit 0 with each refused file named in one warning line (2 with
    one error line would be allowed; this seeded draw writes all four reports), and every record let in passes
    the schema."""
    rng = random.Random(32)
    refused_count = kept_count = reports = 0
    for batch in range(4):
        sweep = tmp_path / f"sweep{batch}"
        for norm, bs, seed in itertools.product(["batch", "instance", "group"], [1, 2], [0, 1]):
            write_record(sweep / f"{norm}-{bs}-{seed}", json.dumps(base_record(rng, seed, norm, bs)))
        mutants = [
            write_record(sweep / f"mutant{i}", mutate(rng, base_record(rng, 100 + 50 * batch + i)))
            for i in range(50)
        ]
        metric = rng.choice(["val_dice", "val_dice", "val_hd95", "best_val_dice"])
        args = [str(sweep), "--out", str(tmp_path / f"out{batch}"), "--metric", metric]
        code, _, stderr = run_main(
            [*args, "--reference", rng.choice(["instance", "instance", "group"])], capsys
        )
        lines = stderr.strip().splitlines()
        assert code in (0, 2), (code, stderr)
        assert all(line.startswith(("warning: ", "error: ")) for line in lines), stderr
        if code == 2:
            assert len([line for line in lines if line.startswith("error: ")]) == 1, stderr
            continue
        reports += 1
        named = {Path(line.split(": ", 2)[2].split(" (")[0]) for line in lines if "unreadable" in line}
        refused_count += len(named & set(mutants))
        kept_count += len(set(mutants) - named)
        for path in set(mutants) - named:  # what the door let in holds only values in range
            assert schema.problem(safe_io.load_json(path)) is None
    assert reports == 4 and refused_count > 50 and kept_count > 20, (reports, refused_count, kept_count)


def test_a_record_whose_summary_differs_from_its_cases_still_plots(tmp_path: Path) -> None:
    """val_dice 0.9 but per-case scores near 0.5 (a summary over classes, not cases, can differ): the point
    used to lie outside the seeds x cases bar, a negative error bar and a traceback; the interval is now
    centred on the recorded mean, with the model's half-width."""
    for seed in range(2):
        scores = {f"case{i}": 0.5 + 0.001 * (i + seed) for i in range(4)}
        data = make_metrics("group", 1, seed, 0.9, per_case=per_case({"running": scores}))
        write_record(tmp_path / f"run{seed}", json.dumps(data))
    report = build_report([tmp_path])
    (cell,) = report.analysis.conditions[0].cells.values()
    assert cell.metric is not None and cell.metric.mean == pytest.approx(0.9)
    assert cell.metric.low < 0.9 < cell.metric.high and cell.metric.high - cell.metric.low < 0.01
    assert plots.plot_metric_vs_batch_size(report.analysis, tmp_path / "plot.png").stat().st_size > 0


def test_a_plot_an_earlier_report_wrote_and_this_one_does_not_is_removed(
    small_sweep: Path, tmp_path: Path, capsys
) -> None:
    """A difference plot of a reference no longer asked for sat beside the new report, looking current."""
    (small_sweep / "notes.txt").write_text("mine\n")
    assert run_main([str(small_sweep), "--reference", "group"], capsys)[0] == 0
    assert (small_sweep / "difference_to_group.png").is_file()
    assert (
        run_main([str(small_sweep), "--reference", "batch_independent_none"], capsys)[0] == 2
    )  # refused: kept
    assert (small_sweep / "difference_to_group.png").is_file()
    # A manifest may be someone else's: naming a file a report never makes does not get it removed.
    manifest = small_sweep / ".norm-exp-report.json"
    manifest.write_text(json.dumps([*json.loads(manifest.read_text()), "notes.txt"]))
    assert run_main([str(small_sweep)], capsys)[0] == 0  # the default reference, instance: no runs, no plot
    assert not (small_sweep / "difference_to_group.png").exists()
    assert "difference_to_group.png" not in (small_sweep / "report.md").read_text()
    manifest = json.loads((small_sweep / ".norm-exp-report.json").read_text())
    assert "difference_to_group.png" not in manifest and "report.md" in manifest
    assert (small_sweep / "notes.txt").read_text() == "mine\n"  # never the report's: never touched
