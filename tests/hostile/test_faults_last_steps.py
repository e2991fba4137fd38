"""Faults in the last steps (#32 item 5), with real signals: a run stopped (SIGTERM) or killed (SIGKILL) in
each phase, training, a validation, PreciseBN, the label maps of trainer.save_predictions and the end-of-run
writing, then continued by the same command, ends with the metrics.json of a run never interrupted, field by
field (DIFFERING lists the fields that measure time or memory); so does a run whose label maps met a full
disk, run again once there is space. SIGTERM is acted on within a second in the phase it arrives in: the
record says `interrupted`, and the CLI exits with status 3 (docs/reference/cli.md).

One run is stopped again and again, each attempt in the next phase, and compared at the end with a reference
run of the same config. Each phase is found by the line the run logs as it starts. A process start costs
seconds of CPU (torch, MONAI), so the attempts that need a process of their own run the CLI (SIGKILL, and the
exit status of a stop in the last steps); the others call the training code the CLI calls, in this process,
and send SIGTERM to it from a logging handler as the phase's line is logged: the stop request is then there
before the phase's first stop point, and the stop must name that phase (a phase without stop points would
leave the stop to the next phase's)."""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from norm_experiments import run_record
from norm_experiments.errors import UserError
from norm_experiments.training.loop import RunInterrupted, train
from tests.helpers import SMOKE, compose_config, metrics_of

# Subprocess runs of the real CLI or trainings: the full suite runs them, `pytest -m "not slow"` does not.
pytestmark = pytest.mark.slow

# 32 steps at batch size 2, a checkpoint every 4, validations at steps 16 and 32, BatchNorm's three evaluation
# modes and the label maps. Overlapping windows (27 per volume) and 64 PreciseBN patches make each phase a few
# tenths of a second: long enough for a test that polls train.log to send its signal inside it.
ARGS = [
    *SMOKE,
    "trainer.device=cpu",  # bit for bit: a resumed CUDA run ends close to, not at, the same numbers
    "norm=batch",
    "data.batch_size=2",
    "trainer.samples=64",
    "trainer.checkpoint_every_samples=8",
    "trainer.validations=2",
    "trainer.precise_bn_samples=64",
    "trainer.sw_overlap=0.75",
    "trainer.save_predictions=true",
]
# What differs between two runs of the same command: durations, speeds and memory peaks.
DIFFERING = {"wall_time_s", "samples_per_s", "data_wait_fraction", "peak_memory_mb", "peak_cuda_memory_mb"}
STOP_WITHIN_S = 1.0  # SIGTERM acted on (checkpoint and `interrupted` record written) within this long
POLL_S = 0.005


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The reference: the same config trained without interruption (in this process)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert train(compose_config(ARGS), run_dir)["status"] == "completed"
    return metrics_of(run_dir)


class Attempt:
    """One `norm-exp-train` process on the run folder; watches what it adds to train.log."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.log = run_dir, run_dir / "train.log"
        self.offset = self.log.stat().st_size if self.log.exists() else 0
        self.out = run_dir.parent / f"output-{time.time_ns()}.txt"
        command = [*ARGS, "trainer.progress=log", f"hydra.run.dir={run_dir}"]
        with self.out.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "norm_experiments.train", *command],
                cwd=run_dir.parent,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def logged(self) -> str:
        """What this attempt wrote to train.log."""
        if not self.log.exists():
            return ""
        with self.log.open("rb") as f:
            f.seek(self.offset)
            return f.read().decode(errors="replace")

    def output(self) -> str:
        return self.out.read_text()[-3000:]

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.logged():
            assert self.proc.poll() is None, (
                f"ended ({self.proc.returncode}) before {text!r}:\n{self.output()}"
            )
            assert time.monotonic() < deadline, f"no {text!r} in train.log after {timeout} s"
            time.sleep(POLL_S)

    def wait_for_record(self, condition, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while not condition(record := run_record.read(self.run_dir) or {}):
            assert self.proc.poll() is None, f"ended ({self.proc.returncode}):\n{self.output()}"
            assert time.monotonic() < deadline, f"the record never changed as expected: {record}"
            time.sleep(POLL_S)
        return record

    def stop(self) -> float:
        """SIGTERM; returns the seconds until the record said `interrupted`. The run must then exit 3."""
        sent = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.wait_for_record(lambda record: record.get("status") == "interrupted", timeout=60)
        latency = time.monotonic() - sent
        assert self.proc.wait(timeout=60) == 3, self.output()
        assert "Traceback" not in self.output()
        return latency

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


class SignalAt(logging.Handler):
    """Sends SIGTERM to this process as the run logs a line holding `text`."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.INFO)
        self.text, self.sent = text, None

    def emit(self, record: logging.LogRecord) -> None:
        if self.sent is None and self.text in record.getMessage():
            self.sent = time.monotonic()
            os.kill(os.getpid(), signal.SIGTERM)


@contextmanager
def training_logged_to(handler: logging.Handler) -> Iterator[None]:
    """The training's INFO lines go to `handler`; this process's signal handlers are restored afterwards (a
    stopped run leaves its own installed, as a process on its way out)."""
    logger = logging.getLogger("norm_experiments.train")
    level, handlers = logger.level, {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        for sig, previous in handlers.items():
            signal.signal(sig, previous)


def stop_in_process(run_dir: Path, line: str) -> tuple[str, float]:
    """Continue the run in this process with SIGTERM as `line` is logged: (the phase the run says it stopped
    in, seconds from the signal until the checkpoint and the `interrupted` record were written)."""
    handler = SignalAt(line)
    with training_logged_to(handler), pytest.raises(RunInterrupted) as stopped:
        train(compose_config(ARGS), run_dir)
    assert handler.sent is not None, f"no {line!r} logged"
    latency = time.monotonic() - handler.sent
    assert metrics_of(run_dir)["status"] == "interrupted"
    return str(stopped.value), latency


def saved_step(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["state"]["step"]


def history_steps(run_dir: Path) -> list[int]:
    history = torch.load(run_dir / "checkpoint.pt", weights_only=True)["state"]["history"]
    return [entry["step"] for entry in history]


def differences(a: object, b: object, path: str = "") -> list[str]:
    """Where two records differ (floats to 1e-9 relative: the same computation twice on a CPU)."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = [f"{path}.{k}: only in one" for k in sorted(set(a) ^ set(b))]
        for key in sorted(set(a) & set(b)):
            found += differences(a[key], b[key], f"{path}.{key}")
        return found
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12):
        return []
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def test_differences_finds_what_differs() -> None:
    record = {"history": [{"step": 4, "val_dice": 0.5}], "eval_modes": {"running": 0.25}, "steps": 8}
    assert differences(record, record) == []
    assert differences(record, {**record, "history": [*record["history"], {"step": 4, "val_dice": 0.5}]})
    assert differences(record, {**record, "eval_modes": {"running": 0.2500001}}) == [
        ".eval_modes.running: 0.25 != 0.2500001"
    ]
    assert differences(record, {**record, "extra": 1}) == [".extra: only in one"]


def test_a_run_stopped_or_killed_in_every_phase_ends_with_the_uninterrupted_record(
    uninterrupted: dict, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"  # the same folder name as the reference's: the record holds it
    latency: dict[str, float] = {}

    # Training: killed between the checkpoint of step 4 and the validation of step 16.
    attempt = Attempt(run_dir)
    attempt.wait_for_record(lambda record: record.get("steps", 0) >= 4)
    attempt.kill()
    assert "step 16: validation" not in attempt.logged(), "killed after training: the test came too late"
    assert metrics_of(run_dir)["status"] == "running" and saved_step(run_dir) in (4, 8, 12)

    # The validation of step 16: stopped in it, with a checkpoint at step 16 and no history entry for it yet.
    where, latency["validation"] = stop_in_process(run_dir, "step 16: validation on")
    assert where == "validation" and saved_step(run_dir) == 16 and history_steps(run_dir) == []

    # PreciseBN, in the final evaluation (the continued run validated step 16 first).
    where, latency["PreciseBN"] = stop_in_process(run_dir, "PreciseBN:")
    assert (
        where == "PreciseBN in the final evaluation (precise mode)"
        and saved_step(run_dir) == 32
        and history_steps(run_dir) == [16, 32]
    )

    # The label maps (the final evaluation done again first), through the CLI: SIGTERM, exit status 3.
    attempt = Attempt(run_dir)
    attempt.wait_for("predictions: writing")
    latency["predictions (CLI)"] = attempt.stop()
    assert re.search(r"interrupted at step 32 during (PreciseBN in )?predictions:", attempt.logged()), (
        attempt.logged()
    )
    assert not (run_dir / "predictions" / "cases.json").exists()  # written last: the maps were not done
    assert history_steps(run_dir) == [16, 32]  # the final evaluation done again replaced its entry

    # The label maps again, SIGKILL: the checkpoint saved after the final evaluation is all that is left.
    attempt = Attempt(run_dir)
    attempt.wait_for("predictions: writing")
    attempt.kill()
    assert not (run_dir / "predictions" / "cases.json").exists()
    assert metrics_of(run_dir)["status"] == "running" and history_steps(run_dir) == [16, 32]

    # The label maps on a full disk (the first map's temporary file is /dev/full: ENOSPC): the run fails.
    case = sorted(uninterrupted["per_case"]["running"])[0]
    full = run_dir / "predictions" / case / ".running.nii.gz.tmp.nii.gz"
    full.parent.mkdir(parents=True, exist_ok=True)
    full.unlink(missing_ok=True)
    full.symlink_to("/dev/full")
    with pytest.raises(UserError, match="No space left on device"):
        train(compose_config(ARGS), run_dir)
    assert metrics_of(run_dir)["status"] == "failed" and history_steps(run_dir) == [16, 32]
    full.unlink()  # space freed

    # The end: the label maps are written; the record is not yet.
    where, latency["the record"] = stop_in_process(run_dir, "validation cases written to")
    assert where == "the record" and (run_dir / "predictions" / "cases.json").exists()

    # The same command once more completes the run: the reference's record, field by field.
    record = train(compose_config(ARGS), run_dir)
    assert record["status"] == "completed" and metrics_of(run_dir) == record
    compared = [{k: v for k, v in r.items() if k not in DIFFERING} for r in (record, uninterrupted)]
    assert not differences(*compared), differences(*compared)
    slow = {phase: s for phase, s in latency.items() if s > STOP_WITHIN_S}
    assert not slow, f"SIGTERM acted on after more than {STOP_WITHIN_S} s: {slow} (all: {latency})"
