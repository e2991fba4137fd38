"""Helpers for tests: compose the real Hydra config, run an entry point as a user would, read what a run
left behind, and check that a failure was clean."""

from __future__ import annotations

import atexit
import functools
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
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
    """Run an entry point as a user would, `python -m module args` from `cwd`, in a process of its own: forked
    from tests/zygote.py's server, which has imported torch, MONAI and the project once (see there); a fresh
    interpreter where a GPU is visible (CUDA initialized in the server would not work in a forked child)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    command = [sys.executable, "-m", module, *args]
    if _gpu_visible():
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)
    with _ZYGOTE_LOCK:
        global _zygote
        if _zygote is None or _zygote.poll() is not None:
            _zygote = _start_zygote()
        with tempfile.TemporaryDirectory(prefix="run-cli-") as streams:
            out, err = Path(streams, "stdout"), Path(streams, "stderr")
            request = {"module": module, "args": list(args), "cwd": str(cwd), "env": full_env}
            _zygote.stdin.write(json.dumps({**request, "stdout": str(out), "stderr": str(err)}) + "\n")
            _zygote.stdin.flush()
            pid = _answer(_zygote, "pid", time.monotonic() + 60)
            try:
                status = _answer(_zygote, "status", time.monotonic() + timeout)
            except subprocess.TimeoutExpired:
                os.kill(pid, signal.SIGKILL)
                _answer(_zygote, "status", time.monotonic() + 60)
                raise subprocess.TimeoutExpired(command, timeout, out.read_text(), err.read_text()) from None
            return subprocess.CompletedProcess(command, status, out.read_text(), err.read_text())


@functools.cache
def _gpu_visible() -> bool:
    import torch

    return torch.cuda.is_available()


_ZYGOTE_LOCK = threading.Lock()
_zygote: subprocess.Popen | None = None


def _start_zygote() -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("zygote.py"))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    atexit.register(server.kill)
    _answer(server, "ready", time.monotonic() + 300)
    return server


def _answer(server: subprocess.Popen, key: str, deadline: float) -> object:
    """The value of `key` in the server's next line that has it (a line left by a command whose caller was
    interrupted is skipped), or TimeoutExpired when none comes before `deadline`."""
    fd = server.stdout.fileno()
    answer: dict = {}
    while key not in answer:
        line = b""
        while not line.endswith(b"\n"):
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise subprocess.TimeoutExpired(server.args, deadline - time.monotonic())
            chunk = os.read(fd, 1)  # byte by byte: nothing of the next answer is read ahead
            if not chunk:
                raise RuntimeError(f"tests/zygote.py ended (status {server.wait()})")
            line += chunk
        answer = json.loads(line)
    return answer[key]


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
