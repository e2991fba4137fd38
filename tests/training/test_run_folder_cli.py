"""What happens to a run folder when processes meet it, through the real CLI and real processes: one process
per folder (a lock the OS releases even after kill -9), signals at awkward moments, a crash, a kill, a
changed norm forced onto a checkpoint, and the permissions of what a run writes (issue #15)."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from norm_experiments import run_record
from norm_experiments.errors import UserError
from norm_experiments.run_record import Status
from norm_experiments.train import write_crash_log
from norm_experiments.training.run_folder import locked
from tests.helpers import assert_clean_failure, built_run, metrics_of, no_result_left, run_cli

# Subprocess runs of the real CLI or trainings: the full suite runs them, `pytest -m "not slow"` does not.
pytestmark = pytest.mark.slow

# 64 steps at batch size 1, a checkpoint every 4: stopped or killed early, finished in seconds.
ARGS = [
    "experiment=smoke",
    "data.batch_size=1",
    "trainer.samples=64",
    "trainer.checkpoint_every_samples=4",
    "trainer.eval_modes=false",
    "trainer.progress=log",
    "trainer.num_threads=1",
]
# Trains far longer than any test waits: the process is stopped or killed.
ENDLESS = ["experiment=smoke", "trainer.samples=1000000", "trainer.progress=log", "trainer.num_threads=1"]


def interruptible() -> None:
    """In the child, before Python starts: Ctrl-C's default disposition. A suite started in the background
    by a non-interactive shell inherits SIGINT ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "norm_experiments.train", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=interruptible,
    )


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"exited early ({proc.returncode}): {proc.communicate()[0][-2000:]}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def record_says(run_dir: Path, status: str, min_steps: int = 0) -> Callable[[], bool]:
    def check() -> bool:
        record = run_record.read(run_dir) or {}
        return record.get("status") == status and record.get("steps", 0) >= min_steps

    return check


def events_in(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("events.out.tfevents.*"))


# ------------------------------------------------------------------------------------- one lock per folder


def test_a_second_process_on_a_run_folder_is_refused_until_the_holder_dies(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = start([*ENDLESS, f"hydra.run.dir={run_dir}"], tmp_path)
    try:
        # It holds the folder and trains: its record says so and its TensorBoard file exists (opened just after
        # the record is first written).
        running = record_says(run_dir, "running")
        wait_until(lambda: running() and bool(events_in(run_dir)), holder)
        holder.send_signal(signal.SIGSTOP)  # paused (the lock held) to leave the CPU to the others
        wait_until(lambda: Path(f"/proc/{holder.pid}/stat").read_text().split(") ")[1][0] == "T", holder)
        overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
        log = (run_dir / "train.log").read_text()
        # Another config and the very same command, both at once on the same folder.
        others = [
            start(["experiment=smoke", "norm=group", f"hydra.run.dir={run_dir}"], tmp_path),
            start([*ENDLESS, f"hydra.run.dir={run_dir}"], tmp_path),
        ]
        for proc in others:
            output = proc.communicate(timeout=120)[0]
            result = subprocess.CompletedProcess(proc.args, proc.returncode, output, "")
            assert_clean_failure(result, f"error: {run_dir} is in use by process {holder.pid} on ")
        assert holder.poll() is None  # the holder trains on, its folder as it was
        assert (run_dir / ".hydra" / "overrides.yaml").read_text() == overrides
        assert (run_dir / "train.log").read_text() == log  # the holder is paused: nobody else wrote
        assert metrics_of(run_dir)["norm"] == "batch" and len(events_in(run_dir)) == 1
        holder.send_signal(signal.SIGKILL)  # kill -9: the OS releases the lock
        holder.wait(timeout=60)
    finally:
        holder.kill()
        holder.communicate()
    third = run_cli(
        ["experiment=smoke", "norm=group", "trainer.eval_modes=false", "trainer.overwrite=true"]
        + [f"hydra.run.dir={run_dir}"],
        tmp_path,
    )
    assert third.returncode == 0, third.stderr[-3000:]
    metrics = metrics_of(run_dir)
    assert metrics["status"] == "completed" and metrics["norm"] == "group"
    assert len(events_in(run_dir)) == 1  # the killed holder's curves were removed with its run
    assert "norm=group" in (run_dir / ".hydra" / "overrides.yaml").read_text()


def test_a_folder_where_the_lock_file_belongs_is_one_line(tmp_path: Path) -> None:
    (tmp_path / ".lock").mkdir()
    with pytest.raises(UserError, match=r"^cannot lock .*/\.lock: Is a directory$"), locked(tmp_path):
        pass


def test_a_folder_where_metrics_json_belongs_is_one_line(tmp_path: Path) -> None:
    run = built_run(tmp_path, ["experiment=smoke"])  # in process: what Run.train() writes first
    (tmp_path / "metrics.json").mkdir()
    with pytest.raises(UserError, match=r"^could not write .*/metrics\.json: Is a directory$"):
        run.write_record(Status.RUNNING)


# ----------------------------------------------------------------------------------------------- signals


@pytest.fixture(scope="module")
def twice_interrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """A run stopped by two Ctrl-C (SIGINT) in quick succession after its first checkpoint."""
    cwd = tmp_path_factory.mktemp("sigint")
    run_dir = cwd / "run"
    proc = start([*ARGS, f"hydra.run.dir={run_dir}"], cwd)
    wait_until(lambda: (run_dir / "checkpoint.pt").exists(), proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.01)
    proc.send_signal(signal.SIGINT)  # used to interrupt the checkpoint save: traceback, record `running`
    output = proc.communicate(timeout=120)[0]
    return run_dir, subprocess.CompletedProcess(proc.args, proc.returncode, output, "")


def test_two_quick_ctrl_c_stop_cleanly_and_the_run_resumes(
    twice_interrupted: tuple[Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    stopped_dir, result = twice_interrupted
    assert_clean_failure(result, "interrupted at step", code=3)
    run_dir = tmp_path / "run"
    shutil.copytree(stopped_dir, run_dir)  # the fixture's folder stays as it was for the next test
    stopped = metrics_of(run_dir)
    assert stopped["status"] == "interrupted" and 0 < stopped["steps"] < 64
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)["state"]["step"]
    assert saved == stopped["steps"]  # the record and the checkpoint agree

    again = run_cli([*ARGS, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming {run_dir} from step {saved}/64" in again.stdout + again.stderr
    assert metrics_of(run_dir)["status"] == "completed" and metrics_of(run_dir)["steps"] == 64


def test_force_resume_with_another_norm_is_one_line_and_keeps_the_run(
    twice_interrupted: tuple[Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    """trainer.force_resume=true after changing the norm: the checkpoint's weights do not fit the model."""
    run_dir = tmp_path / "run"
    shutil.copytree(twice_interrupted[0], run_dir)
    checkpoint = (run_dir / "checkpoint.pt").read_bytes()
    record = metrics_of(run_dir)

    result = run_cli([*ARGS, "norm=group", "trainer.force_resume=true", f"hydra.run.dir={run_dir}"], tmp_path)
    assert_clean_failure(result, "checkpoint.pt: its weights do not fit this model", "unexpected")
    assert "running_mean" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert (run_dir / "checkpoint.pt").read_bytes() == checkpoint  # nothing the user had is lost
    # The record too: the run's own command still continues it (its record used to say `failed`, group).
    assert metrics_of(run_dir) == record and not (run_dir / "model.pt").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_data_is_generated_is_one_line_and_leaves_nothing(tmp_path: Path, sig) -> None:
    """Ctrl-C or SIGTERM before training starts (here while the synthetic dataset is written)."""
    cache = tmp_path / "cache"
    args = ["data.synthetic.num_cases=40", "data.synthetic.shape=[64,64,64]", f"data.cache_dir={cache}"]
    proc = start([*ARGS, *args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    wait_until(lambda: any(cache.glob(".synthetic-*.tmp-*/imagesTr/*")), proc)
    proc.send_signal(sig)
    output = proc.communicate(timeout=120)[0]
    result = subprocess.CompletedProcess(proc.args, proc.returncode, output, "")
    assert_clean_failure(result, "interrupted: run the same command again", code=3)
    assert no_result_left(tmp_path) and not (tmp_path / "run" / "metrics.json").exists()
    assert list(cache.iterdir()) == []  # no half-written dataset in the cache


# ------------------------------------------------------------------------------------- an internal error

# A copy of norm-exp-train with one fault injected (a bug cannot be caused otherwise): planning a run with
# seed 0 raises. Run as `python -m crashing_train` from the test's folder.
CRASHING_TRAIN = """
from norm_experiments import train
from norm_experiments.training import loop

real_make_plan = loop.make_plan


def make_plan(cfg, job_num=0):
    if cfg.seed == 0:
        raise RuntimeError("injected fault\\nsecond line")
    return real_make_plan(cfg, job_num)


loop.make_plan = make_plan
train.main()
"""


def test_a_crash_has_its_own_exit_status_one_line_and_a_traceback_file(tmp_path: Path) -> None:
    (tmp_path / "crashing_train.py").write_text(CRASHING_TRAIN)
    run_dir = tmp_path / "run"
    result = run_cli(["experiment=smoke", f"hydra.run.dir={run_dir}"], tmp_path, module="crashing_train")
    assert_clean_failure(result, code=5)
    assert result.stderr.strip().splitlines() == [
        "error: internal error (RuntimeError: injected fault second line); "
        f"traceback in {run_dir / 'crash.log'}"
    ]
    log = (run_dir / "crash.log").read_text()
    assert "Traceback (most recent call last)" in log and "in make_plan" in log and "injected fault" in log
    assert no_result_left(tmp_path)


def test_a_crash_in_a_sweep_is_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    (tmp_path / "crashing_train.py").write_text(CRASHING_TRAIN)
    sweep = tmp_path / "sweep"
    result = run_cli(
        ["-m", "experiment=smoke", "trainer.samples=4", "seed=0,1", f"hydra.sweep.dir={sweep}"],
        tmp_path,
        module="crashing_train",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in output, output[-3000:]
    (crashed,) = [p.parent for p in sweep.glob("*seed=0*/metrics.json")]
    (completed,) = [p.parent for p in sweep.glob("*seed=1*/metrics.json")]
    assert metrics_of(crashed)["status"] == "failed"
    assert metrics_of(crashed)["error"] == "internal error: RuntimeError: injected fault second line"
    assert "injected fault" in (crashed / "crash.log").read_text()
    assert metrics_of(completed)["status"] == "completed"
    assert f"traceback in {crashed / 'crash.log'}" in output


def test_a_crash_before_any_run_folder_leaves_its_traceback_in_a_temporary_file() -> None:
    try:
        raise KeyError("no such thing")
    except KeyError as err:
        path = write_crash_log(err, None)
    assert path is not None and path.name.startswith("norm-exp-train-crash-")
    try:
        assert "KeyError: 'no such thing'" in path.read_text()
    finally:
        path.unlink()


# ------------------------------------------------------------------------------------------- permissions


def test_result_files_follow_the_umask(tmp_path: Path) -> None:
    modes = {0o022: 0o644, 0o077: 0o600}
    procs = {
        umask: subprocess.Popen(
            [sys.executable, "-m", "norm_experiments.train", "experiment=smoke", "trainer.samples=4"]
            + ["trainer.eval_modes=false", "trainer.num_threads=1", f"hydra.run.dir={tmp_path / oct(umask)}"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=lambda umask=umask: os.umask(umask),
        )
        for umask in modes
    }
    for umask, proc in procs.items():
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, output[-3000:]
        for name in ("metrics.json", "checkpoint.pt", "model.pt", "best_model.pt", "run_config.yaml"):
            mode = stat.S_IMODE((tmp_path / oct(umask) / name).stat().st_mode)
            assert mode == modes[umask], (oct(umask), name, oct(mode))


def test_a_completed_run_of_another_config_lists_only_what_changes_the_run(tmp_path: Path) -> None:
    """force_resume=true on a completed run: refused, listing the budget change but not the flag itself
    (printed first before, as 'False -> True'), and no advice to add the flag the user just added."""
    run_dir = tmp_path / "run"
    short = ["experiment=smoke", "trainer.samples=8", "trainer.eval_modes=false", f"hydra.run.dir={run_dir}"]
    assert run_cli(short, tmp_path).returncode == 0
    record = metrics_of(run_dir)

    result = run_cli([*short, "trainer.samples=16", "trainer.force_resume=true"], tmp_path)
    assert_clean_failure(result, "holds a completed run of a different config (trainer.samples: 8 -> 16)")
    assert "force_resume" not in result.stderr, result.stderr
    assert metrics_of(run_dir) == record


def test_the_temporary_files_of_writes_a_killed_run_left_are_removed_when_the_folder_is_locked_again(
    tmp_path: Path,
) -> None:
    """A run killed during a checkpoint save left `.checkpoint.pt.XXXXXXXX.tmp` (a whole checkpoint) for good; each
    kill during a save added one. Whoever locks the folder next removes ours, and only ours."""
    ours = [".checkpoint.pt.2b57e2l2.tmp", ".metrics.json.kkorg23l.tmp", ".model.pt.a_b1c2d3.tmp"]
    kept = [".notes.txt.2b57e2l2.tmp", "checkpoint.pt", ".metrics.json.short.tmp"]
    for name in ours + kept:
        (tmp_path / name).write_bytes(b"x" * 64)
    (tmp_path / "elsewhere.pt").write_bytes(b"keep")
    os.symlink(tmp_path / "elsewhere.pt", tmp_path / ".best_model.pt.zzzzzzzz.tmp")  # a link: not ours
    with locked(tmp_path):
        pass
    left = {p.name for p in tmp_path.iterdir()}
    assert not left & set(ours)
    assert set(kept) | {"elsewhere.pt", ".best_model.pt.zzzzzzzz.tmp"} <= left
