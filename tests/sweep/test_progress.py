"""The sweep's progress count (sweep/progress.py), read from its events file as the runs' processes write it."""

from __future__ import annotations

from pathlib import Path

from norm_experiments.sweep import progress


def test_a_killed_sweeps_leftover_worker_never_counts_past_the_total(tmp_path: Path) -> None:
    """After kill -9 of a joblib sweep its worker finished its run while the sweep ran again: "run 3 of 2 done
    (150 %)"."""
    progress.start(tmp_path, 2)
    assert progress.started_line(tmp_path, "norm=batch").startswith("[sweep] run 1 of 2 started: norm=batch")
    progress.started_line(tmp_path, "norm=group")
    assert "run 1 of 2 done: norm=batch  x  (50 %" in progress.finished_line(tmp_path, "norm=batch", "x")
    progress._append(tmp_path, "end norm=batch")  # the killed sweep's worker, ending the same run once more
    progress._append(tmp_path, "end norm=instance")  # and one this sweep never started
    line = progress.finished_line(tmp_path, "norm=group", "y")
    assert line.startswith("[sweep] run 2 of 2 done: norm=group  y  (100 %"), line


def test_runs_skipped_as_completed_are_named_and_left_out_of_the_eta(tmp_path: Path, monkeypatch) -> None:
    """A resumed sweep skips its completed runs in a second each: counted in the rate, they made the ETA a
    fraction of the time left."""
    import json
    import os

    from omegaconf import OmegaConf

    clock = [1000.0]
    monkeypatch.setattr(progress.time, "time", lambda: clock[0])
    progress.start(tmp_path, 4)
    done_run = tmp_path / "norm=batch"
    done_run.mkdir()
    (done_run / "metrics.json").write_text(json.dumps({"status": "completed"}))
    os.utime(done_run / "metrics.json", (900.0, 900.0))  # completed before this sweep started
    config = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(done_run)}}})
    assert progress.trained_before(config, tmp_path)
    for name in ("norm=batch", "norm=group"):
        progress.started_line(tmp_path, name)
    clock[0] = 1001.0
    line = progress.finished_line(tmp_path, "norm=batch", "val_dice=0.7000", skipped=True)
    assert "run 1 of 4 done: norm=batch  skipped, already completed (val_dice=0.7000)" in line
    assert "ETA" not in line  # nothing trained yet: no rate to go on
    clock[0] = 1061.0  # the first run that trained took a minute
    line = progress.finished_line(tmp_path, "norm=group", "val_dice=0.8000")
    assert line.endswith("(50 %, 1 min elapsed, ETA 2 min)"), line  # 61 s per trained run, 2 left
    fresh = tmp_path / "norm=instance"
    fresh.mkdir()
    (fresh / "metrics.json").write_text("{}")  # written now: trained in this sweep
    config = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(fresh)}}})
    assert not progress.trained_before(config, tmp_path)


def test_the_end_of_sweep_count_is_of_the_runs_this_sweep_started(tmp_path: Path) -> None:
    """A narrower sweep over a folder of a wider one counted every run there as its own ("12 skipped" after
    launching 8)."""
    import json

    from norm_experiments.sweep.callback import sweep_status

    progress.start(tmp_path, 2)
    for seed in range(3):
        run = tmp_path / f"seed={seed}"
        run.mkdir()
        (run / "metrics.json").write_text(json.dumps({"status": "completed" if seed else "interrupted"}))
    for seed in (1, 2):
        progress.started_line(tmp_path, f"seed={seed}", (tmp_path / f"seed={seed}").absolute())
    ran = progress.launched(tmp_path)
    assert ran == {(tmp_path / "seed=1").absolute(), (tmp_path / "seed=2").absolute()}
    assert sweep_status(tmp_path, 0.0, ran) == {"completed": 2}
    assert sweep_status(tmp_path, 0.0) == {"completed": 2, "interrupted": 1}


def test_a_second_sweep_of_the_same_folder_is_refused_naming_the_first(tmp_path: Path) -> None:
    """Two sweeps of one folder at once truncated each other's progress and ran into each other's runs."""
    import os
    import socket

    import pytest

    from norm_experiments.errors import UserError

    first = progress.hold_sweep_lock(tmp_path)
    with pytest.raises(UserError) as err:
        progress.hold_sweep_lock(tmp_path)
    assert str(err.value).startswith(
        f"{tmp_path} is in use by the sweep of process {os.getpid()} on {socket.gethostname()}: one sweep at a "
        "time per sweep folder"
    )
    os.close(first)  # the first sweep ends: the folder is free again
    os.close(progress.hold_sweep_lock(tmp_path))


def test_the_end_count_holds_for_a_sweep_folder_named_with_dot_dot(tmp_path: Path) -> None:
    """hydra.sweep.dir=../sw: Hydra records each run's folder without the '..', the folder walk kept it."""
    import json
    import os

    from norm_experiments.sweep.callback import sweep_status

    (tmp_path / "x").mkdir()
    sweep = tmp_path / "x" / ".." / "sw"
    progress.start(sweep, 1)
    run = sweep / "seed=0"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"status": "completed"}))
    progress.started_line(sweep, "seed=0", Path(os.path.abspath(run)))  # as Hydra's runtime.output_dir
    assert sweep_status(sweep, 0.0, progress.launched(sweep)) == {"completed": 1}


def test_a_folder_left_with_only_a_refused_sweeps_lock_is_still_empty(tmp_path: Path) -> None:
    """A sweep refused after taking its lock, before Hydra wrote multirun.yaml, left .sweep.lock behind: the
    next sweep was refused as "a folder that holds files but no multirun.yaml"."""
    import os

    from norm_experiments.command_line import _holds_files_of_its_own

    os.close(progress.hold_sweep_lock(tmp_path))
    progress.start(tmp_path, 2)
    assert not _holds_files_of_its_own(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    assert _holds_files_of_its_own(tmp_path)


def test_the_eta_of_a_resumed_sweep_is_timed_from_its_first_trained_run(tmp_path: Path, monkeypatch) -> None:
    """21 skipped runs took 13 s; timed over them, the ETA said 2 min with 12 s left."""
    clock = [1000.0]
    monkeypatch.setattr(progress.time, "time", lambda: clock[0])
    progress.start(tmp_path, 6)
    for i in range(3):  # three completed runs, skipped slowly (100 s in all)
        progress.started_line(tmp_path, f"seed={i}")
        clock[0] += 100 / 3
        progress.finished_line(tmp_path, f"seed={i}", "val_dice=0.5", skipped=True)
    progress.started_line(tmp_path, "seed=3")  # trained: 30 s
    clock[0] += 30
    line = progress.finished_line(tmp_path, "seed=3", "val_dice=0.6")
    assert line.endswith("(67 %, 2 min elapsed, ETA 60 s)"), line  # 30 s per trained run, 2 left
