"""run_cli's processes (forked from tests/zygote.py) behave as `python -m module` started fresh would."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import run_cli

PROBE = """
import os, sys, threading, time
print("argv", sys.argv[1:], "cwd", os.getcwd(), "env", os.environ.get("PROBE_VALUE"), "name", __name__)
print("to stderr", file=sys.stderr)
action = sys.argv[1]
if action == "exit":
    sys.exit(int(sys.argv[2]))
if action == "message":
    sys.exit("a message")
if action == "raise":
    raise ValueError("raised")
if action == "kill":
    os.kill(os.getpid(), 9)
if action == "interrupt":  # Ctrl-C nobody catches
    os.kill(os.getpid(), 2)
    time.sleep(5)
if action == "thread":  # a non-daemon thread: the interpreter waits for it before it exits
    threading.Thread(target=lambda: (time.sleep(0.3), print("thread done", flush=True))).start()
if action == "atexit":
    import atexit
    atexit.register(lambda: print("atexit ran", flush=True))
if action == "sleep":
    time.sleep(60)
"""


@pytest.fixture
def probe(tmp_path: Path) -> Path:
    (tmp_path / "probe.py").write_text(PROBE)
    return tmp_path


def test_argv_folder_environment_and_both_streams_are_the_commands(probe: Path) -> None:
    result = run_cli(["exit", "0"], probe, module="probe", env={"PROBE_VALUE": "42"})
    assert result.returncode == 0
    assert result.stdout == f"argv ['exit', '0'] cwd {probe} env 42 name __main__\n"
    assert result.stderr == "to stderr\n"
    assert result.args[1:] == ["-m", "probe", "exit", "0"]


@pytest.mark.parametrize(
    ("args", "status", "stderr_has"),
    [
        (["exit", "3"], 3, ""),
        (["message"], 1, "a message"),
        (["raise"], 1, "ValueError: raised"),
        (["kill"], -9, ""),
        (["interrupt"], -2, "KeyboardInterrupt"),
    ],
)
def test_exit_status_as_a_fresh_interpreter_gives_it(
    probe: Path, args: list[str], status: int, stderr_has: str
) -> None:
    result = run_cli(args, probe, module="probe")
    assert result.returncode == status
    assert stderr_has in result.stderr


def test_threads_and_atexit_finish_before_the_process_ends(probe: Path) -> None:
    assert "thread done" in run_cli(["thread"], probe, module="probe").stdout
    assert "atexit ran" in run_cli(["atexit"], probe, module="probe").stdout


def test_a_timeout_kills_the_command_and_the_next_one_runs(probe: Path) -> None:
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_cli(["sleep"], probe, module="probe", timeout=1)
    assert time.monotonic() - started < 30
    assert run_cli(["exit", "5"], probe, module="probe").returncode == 5
