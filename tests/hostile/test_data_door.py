"""Inputs at the door of the data layer (#32 item 6): symlinks (followed when the user made them, one line when
they loop or lead nowhere), a validation case that is a copy of a training case, a header that claims more
voxels than the memory holds, a damaged file of a dataset the project keeps in its cache, and the temporary
files and folders a failed or killed generator leaves. Real NIfTI files, real links, a real kill -9 and a
real full disk (a tmpfs; skipped where it cannot be mounted). In process, but for one run of the CLI."""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from norm_experiments import safe_io
from norm_experiments.data.checks import check_cases, check_split_leak
from norm_experiments.data.layouts import find_cases, split_cases
from norm_experiments.data.pipeline import load_data
from norm_experiments.data.preprocessing import cached_statistics
from norm_experiments.data.synthetic import SynthConfig, ensure_synthetic, generate_dataset
from norm_experiments.errors import UserError
from tests.helpers import SMOKE, compose_config, fill, no_result_left, run_cli
from tests.hostile.test_odd_inputs import _claim_shape

TINY = SynthConfig(num_cases=4, shape=(16, 16, 16), radius_range=(2.0, 4.0), seed=7)
IMAGES = {"msd": "imagesTr/synth_001.nii.gz", "nnunet": "imagesTr/synth_001_0000.nii.gz"}


def _image(root: Path, layout: str) -> Path:
    return root / IMAGES.get(layout, "images/synth_001.nii.gz")


# ---------------------------------------------------------------------------------------------------------
# Symlinks


@pytest.mark.parametrize("layout", ["msd", "nnunet", "folder"])
@pytest.mark.parametrize("kind", ["loop", "broken"])
def test_a_link_that_loops_or_leads_nowhere_is_one_line_naming_it(
    layout: str, kind: str, tmp_path: Path
) -> None:
    """A loop was a RuntimeError (exit 5) in the MSD layout, and in the others the case's image went unseen
    (a misleading 'label without images'); a broken link was 'outside the dataset folder'."""
    root = generate_dataset(tmp_path / "data", TINY, layout)
    image = _image(root, layout)
    image.unlink()
    if kind == "loop":
        image.symlink_to(f"{image.name}.other")
        image.with_name(f"{image.name}.other").symlink_to(image.name)
        expected = "a symlink loop"
    else:
        image.symlink_to(tmp_path / "gone.nii.gz")
        expected = f"a broken symlink (it points to {tmp_path / 'gone.nii.gz'}, which does not exist)"
    with pytest.raises(UserError) as err:
        find_cases(layout, root, labels=[0, 1, 2] if layout == "folder" else None)
    message = str(err.value)
    assert message.startswith(f"{image.relative_to(root)}: {expected}"), message


@pytest.mark.parametrize("layout", ["nnunet", "folder"])
def test_images_linked_in_from_outside_are_followed(layout: str, tmp_path: Path) -> None:
    """Data linked into a dataset folder (the MSD layout: tests/hostile/test_fetch_hostile.py)."""
    root = generate_dataset(tmp_path / "data", TINY, layout)
    image = _image(root, layout)
    outside = tmp_path / "store" / "scan.nii.gz"
    outside.parent.mkdir()
    image.rename(outside)
    image.symlink_to(outside)
    cases, info = find_cases(layout, root, labels=[0, 1, 2] if layout == "folder" else None)
    check_cases(cases, info)  # every voxel read, through the link
    assert cases[1].images == (image,) and len(cases) == 4


@pytest.mark.slow  # a subprocess of the real CLI
def test_a_symlink_loop_through_the_cli_is_one_line_and_exit_2(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / "data", TINY, "msd")
    image = root / IMAGES["msd"]
    image.unlink()
    image.symlink_to(image.name)
    result = run_cli([*SMOKE, "data=msd", f"data.root={root}", "hydra.run.dir=run"], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output, output[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {IMAGES['msd']}: a symlink loop (it points to synth_001.nii.gz, and following the links never "
        f"reaches a file) (listed in {root}/dataset.json 'training'[1])"
    ], output[-3000:]
    assert no_result_left(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# A validation case that is a copy of a training case


def _copy_case(root: Path, source: str, copy: str) -> None:
    for folder in ("imagesTr", "labelsTr"):
        shutil.copyfile(root / folder / f"{source}.nii.gz", root / folder / f"{copy}.nii.gz")


def test_a_validation_case_copied_from_a_training_case_is_refused_naming_both(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / "data", TINY, "msd")
    _copy_case(root, "synth_000", "synth_003")  # synth_003: the validation case below
    cfg = compose_config([*SMOKE, "data=msd", f"data.root={root}", "data.val_cases=[synth_003]"])
    with pytest.raises(UserError) as err:
        load_data(cfg.data)
    assert str(err.value).startswith(
        "imagesTr/synth_003.nii.gz: validation case 'synth_003' has the same image bytes as training case "
        "'synth_000' (imagesTr/synth_000.nii.gz)"
    ), err.value
    assert "data.val_cases" in str(err.value)


def test_same_size_is_not_the_same_case(tmp_path: Path) -> None:
    """Sizes only choose which files are hashed: a copy with one byte changed (the gzip time stamp: the same
    voxels, which check_preprocessed reports) is not refused here, and neither is a copy within one split."""
    root = generate_dataset(tmp_path / "data", TINY, "msd")
    _copy_case(root, "synth_000", "synth_003")
    copy = root / "imagesTr" / "synth_003.nii.gz"
    raw = bytearray(copy.read_bytes())
    raw[4] ^= 1  # gzip MTIME
    copy.write_bytes(bytes(raw))
    assert gzip.decompress(copy.read_bytes()) == gzip.decompress(
        (root / "imagesTr/synth_000.nii.gz").read_bytes()
    )
    cases, info = find_cases("msd", root)
    check_split_leak(*split_cases(cases, 0.5, 0, ["synth_003"]), info)
    check_split_leak(*split_cases(cases, 0.5, 0, ["synth_001"]), info)  # synth_000 and its copy both train


# ---------------------------------------------------------------------------------------------------------
# A header that claims more voxels than the memory holds


def test_a_header_claiming_more_voxels_than_memory_holds_is_refused_before_any_is_read(
    tmp_path: Path,
) -> None:
    """A cube whose float32 image, label and indices (16 bytes per voxel) fill 60% of the physical memory:
    the old check (cached bytes against physical memory) let it through, to be read whole; loading it
    also takes about as much again, more than any machine has available. 800^3 voxels on a 16 GiB machine."""
    side = round((0.6 * safe_io.memory_bytes() / 16) ** (1 / 3))
    root = generate_dataset(tmp_path / "data", TINY, "msd")
    _claim_shape(root / "imagesTr" / "synth_002.nii.gz", (side, side, side))
    cfg = compose_config([*SMOKE, "data=msd", f"data.root={root}"])
    with pytest.raises(UserError) as err:
        load_data(cfg.data)
    message = str(err.value)
    assert message.startswith(f"imagesTr/synth_002.nii.gz: its header claims {side}x{side}x{side} voxels"), (
        message
    )
    assert "GiB of available memory" in message and "\n" not in message


# ---------------------------------------------------------------------------------------------------------
# A damaged file of a generated dataset in the cache


@pytest.mark.parametrize("check_files", ["true", "false"])
def test_a_damaged_cache_file_is_named_in_full_with_the_remedy(check_files: str, tmp_path: Path) -> None:
    """Named relative to a cache folder the message did not name; with data.check_files=false an internal
    error (exit 5). Now: the full path, and that deleting the folder regenerates it, which it does."""
    cache = tmp_path / "cache"
    overrides = [
        *SMOKE,
        f"data.cache_dir={cache}",
        "data.synthetic.num_cases=4",
        "data.synthetic.shape=[16,16,16]",
    ]
    overrides += ["data.patch_size=[8,8,8]", f"data.check_files={check_files}"]
    cfg = compose_config(overrides)
    load_data(cfg.data)  # generated into the cache
    (folder,) = cache.glob("synthetic-*")
    damaged = folder / "imagesTr" / "synth_002.nii.gz"
    damaged.write_bytes(damaged.read_bytes()[:300])
    with pytest.raises(UserError) as err:
        load_data(cfg.data)
    message = str(err.value)
    assert message.startswith(f"{damaged}: "), message
    assert message.endswith(
        f"; this dataset is a cache: delete the folder {folder} and the next run generates it again"
    ), message
    shutil.rmtree(folder)  # as the message says
    assert len(load_data(cfg.data).train) == 3


# ---------------------------------------------------------------------------------------------------------
# Temporary files and folders


def test_a_killed_generators_folder_is_removed_at_the_next_start(tmp_path: Path) -> None:
    """kill -9 in the middle of writing a dataset (no handler runs): its work folder stays until the next
    generator in that cache starts, whatever dataset that one is for."""
    cache = tmp_path / "cache"
    big = "SynthConfig(num_cases=500, shape=(16, 16, 16), radius_range=(2.0, 4.0))"
    code = f"from norm_experiments.data.synthetic import SynthConfig, ensure_synthetic; ensure_synthetic({str(cache)!r}, {big})"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 60
        while not list(cache.glob(".synthetic-*.tmp-*/imagesTr/*.nii.gz")) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (left,) = cache.glob(".synthetic-*")
    assert f"-{proc.pid}-" in left.name
    live = cache / f".synthetic-x.tmp-{socket.gethostname()}-{os.getpid()}-live"  # a generator still running
    live.mkdir()
    ensure_synthetic(cache, TINY)  # another dataset
    assert sorted(p.name for p in cache.iterdir()) == sorted([live.name, f"synthetic-{TINY.key()}"])


def test_a_full_disk_leaves_no_half_written_temporaries(tmpfs, tmp_path: Path) -> None:
    disk = tmpfs(256)
    with pytest.raises(UserError, match="cannot write the synthetic dataset there"):
        ensure_synthetic(disk / "cache", SynthConfig(num_cases=40, shape=(24, 24, 24)))
    assert [p.name for p in (disk / "cache").iterdir()] == []
    fill(disk)
    stats = {0: {"mean": 1.0}}
    assert cached_statistics(disk, "f00d", lambda: stats) == stats  # computed, not cached: the run goes on
    assert list((disk / "fingerprints").iterdir()) == []
