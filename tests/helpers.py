"""Helpers for tests: compose the real Hydra config, run an entry point as a user would, read what a run
left behind, and check that a failure was clean."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from norm_experiments import run_record
from norm_experiments.config import CONFIG_DIR, register_resolvers

register_resolvers()


# The smallest real training run (seconds): every test that trains starts from these overrides. One thread:
# the tests share two cores.
SMOKE = ["experiment=smoke", "trainer.num_threads=1"]


def compose_config(overrides: list[str] | None = None, run_dir: Path | None = None) -> DictConfig:
    """The config `norm-exp-train` would build from these overrides (the real config files)."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides or []))
    with open_dict(cfg):
        cfg.trainer.progress = "none"
    return cfg


def run_cli(
    args: list[str],
    cwd: Path,
    timeout: float = 300,
    module: str = "norm_experiments.train",
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """Run an entry point as a user would, in a subprocess, from `cwd`."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def built_run(run_dir: Path, overrides: list[str]):
    """A Run with everything built (data, model, optimizer...) but nothing trained or written."""
    from norm_experiments.training.build import build, make_plan
    from norm_experiments.training.loop import Run

    cfg = compose_config(overrides)
    run = Run(cfg, make_plan(cfg), run_dir)
    run.built = build(cfg, run.plan)
    return run


def metrics_of(run_dir: Path) -> dict:
    """The run's record (metrics.json); fails the test when there is none."""
    record = run_record.read(run_dir)
    assert record is not None, f"no readable {run_record.FILENAME} in {run_dir}"
    return record


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on (for torchrun, TensorBoard, a test HTTP server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_clean_failure(result: subprocess.CompletedProcess, *needles: str, code: int = 2) -> None:
    """A user mistake: exit `code`, no traceback, and every needle in the output."""
    output = (result.stdout or "") + (result.stderr or "")  # None where a stream went to a file
    assert result.returncode == code, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    for needle in needles:
        assert needle in output, output[-3000:]


def no_result_left(folder: Path) -> bool:
    """No record claiming anything but a failure, and no weights, anywhere below `folder`."""
    for path in folder.rglob(run_record.FILENAME):
        if run_record.status_of(run_record.read(path.parent)) != run_record.Status.FAILED:
            return False
    return not list(folder.rglob("model.pt")) and not list(folder.rglob("checkpoint.pt"))


def fill(folder: Path) -> None:
    """Write zeros into `folder` until its filesystem refuses one more byte (a tmpfs fixture's)."""
    import errno

    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as err:
            assert err.errno == errno.ENOSPC
