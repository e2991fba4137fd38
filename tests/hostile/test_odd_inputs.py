"""Files that are not what their name says (a FIFO, /dev/zero, JSON nested 100,000 deep, a 5,000-digit
number, a NIfTI header claiming a huge shape), arguments no filesystem takes (bytes that are not UTF-8, a
300-character name), and standard output that cannot be written (/dev/full, a closed pipe)."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from norm_experiments import run_record, safe_io
from norm_experiments.data.pipeline import load_data
from norm_experiments.data.synthetic import SynthConfig, generate_dataset
from norm_experiments.errors import UserError
from tests.helpers import SMOKE, assert_clean_failure, compose_config, metrics_of, run_cli

# Subprocess runs of the real CLI or trainings: the full suite runs them, `pytest -m "not slow"` does not.
pytestmark = pytest.mark.slow

DEEP = "[" * 100_000 + "]" * 100_000


def _hostile(path: Path, kind: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "deep":
        path.write_text('{"status": "completed", "x": ' + DEEP + "}")
    else:  # "huge int"
        path.write_text('{"status": "completed", "seed": ' + "9" * 5000 + "}")


KINDS = ["fifo", "dev-zero", "deep", "huge int"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_hostile_metrics_json_reads_as_no_record_at_once(kind: str, tmp_path: Path) -> None:
    _hostile(run_record.path_in(tmp_path), kind)
    started = time.monotonic()
    assert run_record.read(tmp_path) is None
    assert time.monotonic() - started < 5
    with pytest.raises(
        safe_io.UnsafeFile,
        match={
            "fifo": "a FIFO",
            "dev-zero": "a character device",
            "deep": "nested 100001 levels deep",
            "huge int": "a number of 5000 characters",
        }[kind],
    ):
        safe_io.load_json(run_record.path_in(tmp_path))


def test_a_too_large_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(safe_io.MAX_JSON_BYTES + 1)  # sparse: no disk used
    with pytest.raises(safe_io.UnsafeFile, match="big.json: refused, 64.0 MiB is more than the 64 MiB"):
        safe_io.load_json(big)


@pytest.mark.parametrize("kind", ["fifo", "deep"])
def test_training_over_a_hostile_metrics_json_neither_hangs_nor_crashes(kind: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _hostile(run_record.path_in(run_dir), kind)
    result = run_cli([*SMOKE, f"hydra.run.dir={run_dir}"], cwd=tmp_path, timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert metrics_of(run_dir)["status"] == "completed"  # the record replaced what was there


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_resume_with_a_hostile_overrides_file_is_one_line(kind: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _hostile(run_dir / ".hydra" / "overrides.yaml", kind)
    result = run_cli([f"resume={run_dir}"], cwd=tmp_path, timeout=120)
    kind_text = "a FIFO (named pipe)" if kind == "fifo" else "a character device"
    assert_clean_failure(result, f"overrides.yaml: refused, {kind_text} where a file is expected")


def _claim_shape(path: Path, shape: tuple[int, ...]) -> None:
    """Rewrite a .nii.gz so that its header claims `shape`; the voxels stay as few as they were."""
    img = nib.load(str(path))
    header = img.header.copy()
    header.set_data_shape(shape)
    block = io.BytesIO()
    header.write_to(block)  # the header and its (empty) extension flag
    raw = block.getvalue().ljust(int(header["vox_offset"]), b"\0") + np.asanyarray(img.dataobj).tobytes()
    path.write_bytes(gzip.compress(raw))
    assert nib.load(str(path)).shape == shape


def test_a_header_claiming_a_huge_shape_is_refused_before_any_voxel_is_read(tmp_path: Path) -> None:
    root = generate_dataset(
        tmp_path / "data",
        SynthConfig(num_cases=4, shape=(16, 16, 16), radius_range=(2.0, 4.0), seed=1),
        "msd",
    )
    bomb = root / "imagesTr" / "synth_002.nii.gz"
    _claim_shape(bomb, (30_000, 30_000, 30_000))
    cfg = compose_config([*SMOKE, "data=msd", f"data.root={root}"])
    with pytest.raises(
        UserError, match=r"imagesTr/synth_002.nii.gz: its header claims 30000x30000x30000 voxels"
    ):
        load_data(cfg.data)
    result = run_cli([*SMOKE, "data=msd", f"data.root={root}"], cwd=tmp_path, timeout=120)
    assert_clean_failure(result, "synth_002.nii.gz: its header claims", "more than this machine's")


LONG = "a" * 300


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        (b"hydra.run.dir=out/r\xff", "holds bytes that are not UTF-8"),
        (b"data.root=/tmp/d\xff", "holds bytes that are not UTF-8"),
        (b"name=n\xff", "holds bytes that are not UTF-8"),
        (f"hydra.run.dir=out/{LONG}".encode(), "is 300 bytes long, more than the 255"),
        (f"data.root=/tmp/{LONG}".encode(), "is 300 bytes long, more than the 255"),
        (f"name={LONG}".encode(), "is 300 bytes long, more than the 255"),
    ],
)
def test_unusable_names_are_refused_in_one_line(arg: bytes, expected: str, tmp_path: Path) -> None:
    for sweep in ([], [b"-m"]):
        result = subprocess.run(
            [sys.executable.encode(), b"-m", b"norm_experiments.train", *sweep, b"experiment=smoke", arg],
            cwd=tmp_path,
            capture_output=True,
            timeout=120,
        )
        err = result.stderr.decode(errors="replace")
        assert result.returncode == 2 and "Traceback" not in err, err[-2000:]
        assert len(err.strip().splitlines()) == 1 and expected in err, err
    assert list(tmp_path.iterdir()) == []


def test_summary_into_a_full_or_closed_stdout_is_one_line(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "norm_experiments.train", *SMOKE, f"hydra.run.dir={tmp_path}/run"]
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            command, cwd=tmp_path, stdout=full, stderr=subprocess.PIPE, text=True, timeout=300
        )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: cannot write to standard output (ENOSPC: No space left on device); output lost"
    )
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    assert metrics_of(tmp_path / "run")["status"] == "completed"  # the run itself is not lost
    # The same command into a pipe whose reader has gone: the run is skipped, its two lines cannot be written.
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("error: cannot write to standard output (EPIPE"), err
