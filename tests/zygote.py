"""A fork server for the tests' `python -m <entry point>` processes (tests/helpers.py `run_cli`).

Every CLI process of the suite would import torch, torch._dynamo (the optimizer imports it), MONAI (which loads
all its submodules twice) and the project: about 8 s of CPU before the command does anything, in well over a
hundred processes. This server imports them once, then forks one child per request. The child is a real,
separate process running the real entry point as `python -m` would (runpy, as `__main__`, with the request's
argv, working folder, environment, stdout and stderr), so exit statuses, signals, files and output are the
command's own. What it does not cover is the interpreter's start and the entry point's own imports: the tests
that start a command with subprocess.Popen (signals, kill -9, DDP, the console scripts in test_cli_help) still
start a fresh interpreter, and so does run_cli where a GPU is visible: a call of torch.cuda.is_available()
while this server imports would initialize CUDA here ("poison fork", in PyTorch's words), and CUDA does not
work in a child forked after that.

Protocol, one JSON object per line: the client writes a request {module, args, cwd, env, stdout, stderr} on
the server's stdin; the server answers {"pid": N} once the child runs, and {"status": S} when it has ended
(S as subprocess gives it: the exit code, or minus the signal that killed it).
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import signal
import sys

# What the entry points import, up front. torch._dynamo comes in with torch.optim's first optimizer.
PRELOAD = ("torch", "torch._dynamo", "monai", "hydra", "nibabel", "matplotlib.pyplot", "tensorboard")
# Left to the command: Hydra loads its core plugins again when it scans for plugins, so a sweeper class built
# on a BasicSweeper imported before that scan is not the one Hydra calls (super() fails).
NOT_PRELOADED = ("norm_experiments.sweep.study",)


def preload() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    import norm_experiments

    for module in pkgutil.walk_packages(norm_experiments.__path__, "norm_experiments."):
        if module.name not in NOT_PRELOADED:
            importlib.import_module(module.name)


def run_child(request: dict, answers: int) -> None:
    """In the forked child: become `python -m module args` and never return."""
    import atexit
    import io
    import runpy
    import threading

    code = 1
    try:
        os.close(answers)  # the server's end of the protocol is not the command's
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        stdin = os.open(os.devnull, os.O_RDONLY)
        os.dup2(stdin, 0)
        os.close(stdin)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(opened, fd)
            os.close(opened)
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
        sys.stderr = io.TextIOWrapper(
            io.FileIO(2, "w", closefd=False), write_through=True, errors="backslashreplace"
        )
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as a fresh interpreter has them
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sys.path[0] = request["cwd"]  # `python -m` looks in the working folder first
        sys.argv = [request["module"], *request["args"]]
        sys.modules.pop(request["module"], None)  # preloaded; `python -m` runs it before anything imports it
        code = 0
        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        except SystemExit as stop:
            code = exit_code(stop.code)
        except KeyboardInterrupt:  # as the interpreter does since 3.8: the traceback, then death by SIGINT
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        except BaseException:  # as the interpreter does: the traceback on stderr, exit status 1
            import traceback

            traceback.print_exc()
            code = 1
        threading._shutdown()  # the interpreter's own exit: wait for non-daemon threads, then atexit
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def exit_code(code: object) -> int:
    """SystemExit's code as the interpreter turns it into an exit status."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def serve() -> None:
    answers = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol; fd 1 itself goes to stderr
    os.dup2(2, 1)
    preload()
    answers.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_child(request, answers.fileno())
        answers.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        answers.write(json.dumps({"status": os.waitstatus_to_exitcode(status)}) + "\n")


if __name__ == "__main__":
    serve()
