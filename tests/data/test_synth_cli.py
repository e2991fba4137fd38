"""norm-exp-synth on the command line: writes a dataset, or fails with one `error:` line and exit 2."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from norm_experiments.data import synth_cli
from norm_experiments.data.layouts import find_cases
from norm_experiments.data.synthetic import SynthConfig
from tests import helpers
from tests.helpers import assert_clean_failure


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The command as a user runs it (tests/helpers.py's run_cli), from the current folder."""
    return helpers.run_cli(list(args), Path.cwd(), timeout=120, module="norm_experiments.data.synth_cli")


def test_cli_writes_a_dataset(tmp_path):
    out = tmp_path / "synth"
    result = run_cli(
        str(out), "--layout", "nnunet", "--cases", "2", "--shape", "16", "16", "12", "--classes", "3"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines == [f"wrote 2 cases (nnunet layout, 16x16x12 voxels, 3 foreground classes) to {out}"]
    assert (out / "dataset.json").is_file()
    assert (out / "imagesTr" / "synth_001_0000.nii.gz").is_file()
    cases, info = find_cases("nnunet", out)
    assert [c.name for c in cases] == ["synth_000", "synth_001"] and len(info.labels) == 4


def test_cli_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "existing.txt").write_text("keep me")
    result = run_cli(str(tmp_path), "--cases", "1", "--shape", "8", "8", "8")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(tmp_path) in lines[0]
    assert "Traceback" not in result.stderr
    assert (tmp_path / "existing.txt").read_text() == "keep me"


def test_cli_rejects_a_bad_value_without_traceback(tmp_path):
    result = run_cli(str(tmp_path / "x"), "--noise", "-1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: synthetic data: noise_std=(-1.0, -1.0) must be >= 0 (one value, or (min, max) with min <= max)"
    ]
    assert not (tmp_path / "x").exists()


def test_a_wrong_option_is_one_line_naming_it(tmp_path, capsys):
    """argparse's own errors too (errors.OneLineParser): one line, exit 2, no usage block."""
    for argv, needle in (
        ([str(tmp_path / "x"), "--cases", "x"], "argument --cases: invalid int value: 'x'"),
        ([str(tmp_path / "x"), "--casse", "2"], "unrecognized arguments: --casse 2"),
        ([], "the following arguments are required: out_dir"),
    ):
        with pytest.raises(SystemExit) as stop:
            synth_cli.main(argv)
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert (
            err.count("\n") == 1 and err.startswith(f"norm-exp-synth: error: {needle}") and "usage" not in err
        )
        assert "(norm-exp-synth --help lists the options)" in err
    assert not (tmp_path / "x").exists()


def test_a_key_value_override_is_not_taken_for_the_folder(tmp_path):
    """norm-exp-train's habit, `cases=10`, would have written 24 cases into a folder named `cases=10`."""
    result = helpers.run_cli(["cases=10"], tmp_path, timeout=120, module="norm_experiments.data.synth_cli")
    assert_clean_failure(result, "'cases=10' looks like a key=value override", "./cases=10 writes into")
    assert len(result.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []
    written = helpers.run_cli(
        ["./cases=10", "--cases", "1", "--shape", "8", "8", "8"],
        tmp_path,
        module="norm_experiments.data.synth_cli",
    )
    assert written.returncode == 0 and (tmp_path / "cases=10" / "dataset.json").is_file()


def test_every_config_field_is_reachable(tmp_path, monkeypatch):
    seen = {}

    def fake_generate(out_dir: Path, cfg: SynthConfig, layout: str = "msd") -> Path:
        seen.update(out_dir=out_dir, cfg=cfg, layout=layout)
        return out_dir

    monkeypatch.setattr(synth_cli, "generate_dataset", fake_generate)
    expected = SynthConfig(
        num_cases=5,
        shape=(20, 24, 28),
        spacing=(0.8, 0.9, 3.0),
        num_classes=3,
        objects_per_class=(2, 4),
        radius_range=(3.0, 6.0),
        class_imbalance=2.0,
        noise_std=(0.2, 0.5),
        intensity_scale_range=(0.5, 2.0),
        intensity_offset_range=(-1.0, 3.0),
        contrast_range=(0.8, 1.2),
        gamma_range=(0.9, 1.1),
        bias_field=0.1,
        seed=11,
        air_margin=0.1,
    )
    # argv lists every option: the test fails when a new SynthConfig field has no option.
    synth_cli.main(
        [str(tmp_path / "o"), "--layout", "folder", "--cases", "5", "--shape", "20", "24", "28"]
        + ["--spacing", "0.8", "0.9", "3", "--classes", "3", "--objects-per-class", "2", "4"]
        + ["--radius-range", "3", "6", "--class-imbalance", "2", "--noise", "0.2", "0.5"]
        + ["--scale-range", "0.5", "2", "--offset-range", "-1", "3", "--contrast-range", "0.8", "1.2"]
        + ["--gamma-range", "0.9", "1.1", "--bias-field", "0.1", "--seed", "11", "--air-margin", "0.1"]
    )
    assert seen["cfg"] == expected and seen["layout"] == "folder"
    defaults = {f: getattr(SynthConfig(), f) for f in SynthConfig.__dataclass_fields__}
    assert all(getattr(expected, f) != v for f, v in defaults.items()), "every field differs from its default"


def test_cli_into_a_folder_that_cannot_be_created(tmp_path):
    (tmp_path / "a_file").write_text("keep me")
    out = tmp_path / "a_file" / "synth"
    result = run_cli(str(out), "--cases", "1", "--shape", "8", "8", "8")
    assert_clean_failure(result)
    assert result.stderr.strip().splitlines() == [
        f"error: {out}: cannot write the dataset there (File exists)"
    ]
    assert (tmp_path / "a_file").read_text() == "keep me"


def test_an_infinite_spacing_or_a_huge_shape_is_one_line(tmp_path):
    """--spacing inf ended in nibabel's traceback, --shape 100000 100000 100000 in numpy's (909 TiB)."""
    for args, line in (
        (
            ["--spacing", "inf", "1", "1"],
            "spacing=(inf, 1.0, 1.0) must be 3 positive numbers (mm, below 1000)",
        ),
        (
            ["--shape", "100000", "100000", "100000"],
            "shape=(100000, 100000, 100000) must be 3 sizes, each in [8, 512]",
        ),
    ):
        result = run_cli(str(tmp_path / "x"), "--cases", "1", *args)
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [
            f"error: synthetic data: {line}"
        ]
        assert not (tmp_path / "x").exists()


def test_the_current_folder_and_its_permissions(tmp_path, monkeypatch):
    """`norm-exp-synth .` in an empty folder said "could not move the generated dataset into place (Device or
    resource busy)"; and every dataset folder came out 0700 (mkdtemp's), whatever the umask, unreadable to
    another user or a shared NORM_EXP_CACHE."""
    import os
    import stat

    here = tmp_path / "here"
    here.mkdir(mode=0o755)
    monkeypatch.chdir(here)
    old = os.umask(0o022)
    try:
        synth_cli.main([".", "--cases", "2", "--shape", "16", "16", "16"])
    finally:
        os.umask(old)
    assert (here / "dataset.json").is_file() and len(find_cases("msd", here)[0]) == 2
    assert Path.cwd().samefile(here)  # filled, not replaced: a shell there sees the dataset without cd
    assert sorted(p.name for p in Path(".").iterdir()) == ["dataset.json", "imagesTr", "labelsTr"]
    assert stat.S_IMODE(here.stat().st_mode) == 0o755
    assert stat.S_IMODE((here / "imagesTr").stat().st_mode) == 0o755
