"""A symbolic link inside a run or sweep folder (someone else's folder, or a crafted one): training, a sweep
and the report never write or read through it. A rerun wrote Hydra's files through a linked .hydra/ and
appended its log through a linked train.log, wherever they pointed; the report read a linked metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from norm_experiments import run_record, safe_io
from norm_experiments.errors import UserError
from norm_experiments.report.collect import collect
from tests.helpers import assert_clean_failure, run_cli

SMOKE = ["experiment=smoke", "trainer.samples=8"]


def test_link_inside_finds_a_link_at_any_depth_and_none_in_a_plain_folder(tmp_path: Path) -> None:
    (tmp_path / "sweep" / "norm=batch" / "seed=0" / ".hydra").mkdir(parents=True)
    (tmp_path / "sweep" / "norm=batch" / "seed=0" / "train.log").write_text("x")
    assert safe_io.link_inside(tmp_path / "sweep") is None
    submitit = tmp_path / "sweep" / ".submitit"  # the SLURM launcher links its submission files there
    submitit.mkdir()
    (submitit / ".submission_file_1.sh").symlink_to(submitit / "1" / "1_submission.sh")
    assert safe_io.link_inside(tmp_path / "sweep") is None
    (tmp_path / "outside").mkdir()
    deep = tmp_path / "sweep" / "norm=batch" / "seed=0" / ".hydra" / "config.yaml"
    deep.symlink_to(tmp_path / "outside" / "c.yaml")  # dangling: a link counts, not its target
    assert safe_io.link_inside(tmp_path / "sweep") == deep
    assert f"{deep} is a symbolic link (to {tmp_path / 'outside' / 'c.yaml'})" in safe_io.link_problem(
        tmp_path / "sweep"
    )


@pytest.mark.slow  # a subprocess of the real CLI
def test_a_run_folder_with_a_linked_train_log_is_refused_and_the_target_kept(tmp_path: Path) -> None:
    outside = tmp_path / "outside.log"
    outside.write_text("the user's own file\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "train.log").symlink_to(outside)
    result = run_cli([*SMOKE, f"hydra.run.dir={run_dir}"], tmp_path)
    assert_clean_failure(result, f"error: {run_dir / 'train.log'} is a symbolic link (to {outside})")
    assert outside.read_text() == "the user's own file\n"
    assert sorted(p.name for p in run_dir.iterdir()) == ["train.log"]  # no lock, record, .hydra/ or weights


@pytest.mark.slow  # a subprocess of the real CLI
def test_a_sweep_folder_holding_a_link_is_refused_before_hydra_writes(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    run_dir = sweep / "norm=batch"
    run_dir.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    (tmp_path / "outside").mkdir()
    (run_dir / ".hydra").symlink_to(tmp_path / "outside")
    result = run_cli(["-m", *SMOKE, "norm=batch,group", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert_clean_failure(result, f"hydra.sweep.dir={sweep}: {run_dir / '.hydra'} is a symbolic link")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not list((tmp_path / "outside").iterdir())
    assert (sweep / "multirun.yaml").read_text() == "hydra: {}\n"


def test_the_report_leaves_out_a_linked_metrics_json(tmp_path: Path) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"status": "completed", "norm": "SECRET=hunter2"}))
    run_dir = tmp_path / "sweep" / "norm=batch"
    run_dir.mkdir(parents=True)
    (run_dir / run_record.FILENAME).symlink_to(secret)
    with pytest.raises(UserError, match="no readable metrics.json") as refused:
        collect([tmp_path / "sweep"])
    assert f"metrics.json (a symbolic link (to {secret}), not a run's own record)" in str(refused.value)
    assert "hunter2" not in str(refused.value)
