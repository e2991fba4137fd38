"""User-facing errors: one clear line, a non-zero exit, no traceback."""

from __future__ import annotations

import argparse
import atexit
import functools
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

# Exit status for a user mistake (bad config, bad data). Distinct from 1, Python's status after an uncaught
# exception (and Hydra's for a command line it refuses); norm-exp-train gives its own crashes 5.
USER_ERROR_EXIT = 2
# The other exit statuses of the commands (docs/reference/cli.md), for scripts and launchers that requeue.
EXIT_INTERRUPTED = (
    3  # SIGTERM/SIGINT: norm-exp-train saved a checkpoint (run it again to continue); fetch kept nothing
)
EXIT_DIVERGED = 4  # norm-exp-train: the loss became NaN/inf: status "diverged" in metrics.json
EXIT_CRASHED = (
    5  # norm-exp-train: an internal error (a bug): one line, the traceback in the run folder's crash.log
)

F = TypeVar("F", bound=Callable[..., object])


class UserError(Exception):
    """A mistake the user can fix (a config key, a file). The message names the key or the file."""


class OneLineParser(argparse.ArgumentParser):
    """argparse for the commands that take options: a wrong argument is one line and exit status 2, instead of
    argparse's usage block (which runs to ten lines for norm-exp-synth) above the error."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} ({self.prog} --help lists the options)", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (OneLineParser then reports anything else in one line)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def exit_on_user_error(func: F) -> F:
    """Wrap a CLI entry point so that a UserError prints one line and exits with USER_ERROR_EXIT."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(USER_ERROR_EXIT)

    return wrapper  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ standard output


class StdoutError(UserError):
    """Standard output cannot be written: a closed pipe (`| head`), a full disk, /dev/full."""


class _GuardedStdout:
    """sys.stdout, with a write error turned into StdoutError (one line, exit 2) instead of a traceback.

    On the first error fd 1 is pointed at /dev/null, so that the flushes still to come (Python flushes
    stdout at exit) succeed instead of printing 'Exception ignored ... BrokenPipeError'; every later write
    raises the same StdoutError, so that an error a logging handler swallowed is still reported at the end.

    With quiet_when_closed, a closed pipe (EPIPE: the reader of `| head` or `| true` has gone) is no error:
    the reader wants no more output, so the rest goes to /dev/null and the command ends as it would have
    (a shell's own commands die of SIGPIPE there, quietly). A full disk or /dev/full stays an error."""

    def __init__(self, stream, quiet_when_closed: bool = False) -> None:
        self._stream = stream
        self._error: StdoutError | None = None
        self.quiet_when_closed = quiet_when_closed

    def _to_devnull(self) -> None:
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def _failed(self, err: OSError) -> None:
        """Raise StdoutError, except for a closed pipe in quiet_when_closed mode (then: output dropped)."""
        import errno

        from norm_experiments.safe_io import os_reason

        if self._error is None:
            self._to_devnull()
            if err.errno == errno.EPIPE and self.quiet_when_closed:
                return
            self._error = StdoutError(f"cannot write to standard output ({os_reason(err)}); output lost")
        raise self._error from None

    def write(self, text: str) -> int:
        if self._error is not None:
            raise StdoutError(str(self._error))
        try:
            return self._stream.write(text)
        except OSError as err:
            self._failed(err)
            return len(text)  # a closed pipe, quietly: the text is dropped

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as err:
            self._failed(err)
        if self._error is not None:
            raise StdoutError(str(self._error))

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def guard_stdout(quiet_when_closed: bool = False) -> None:
    """Install the guard on sys.stdout (an entry point calls it first; twice is harmless). quiet_when_closed:
    a closed pipe drops the rest of the output instead of being an error (see _GuardedStdout)."""
    if isinstance(sys.stdout, _GuardedStdout):
        sys.stdout.quiet_when_closed |= quiet_when_closed
        return
    if hasattr(sys.stdout, "fileno"):
        try:
            sys.stdout.fileno()
        except (OSError, ValueError):  # not a real file (a test's capture): nothing to guard
            return
        guarded = _GuardedStdout(sys.stdout, quiet_when_closed)
        sys.stdout = guarded  # type: ignore[assignment]
        # Python flushes sys.stdout once more after the atexit functions: the stream itself does it then
        # (after an error it writes to /dev/null), so that no 'Exception ignored' follows the error line.
        atexit.register(_unwrap, guarded)


def _unwrap(guarded: _GuardedStdout) -> None:
    """At exit: the error (if any) has been said; later flushes (logging's handlers at shutdown) go quietly
    to /dev/null, which fd 1 points at since the error."""
    guarded._error = None
    if sys.stdout is guarded:
        sys.stdout = guarded._stream


def flush_stdout() -> None:
    """Flush standard output at the end of an entry point: a failure is one `error:` line and exit 2."""
    try:
        sys.stdout.flush()
    except StdoutError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
