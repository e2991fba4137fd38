"""User-facing errors: one clear line, a non-zero exit, no traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

# Exit status for a user mistake (bad config, bad data). Distinct from 1, Python's status after an uncaught
# exception (and Hydra's for a command line it refuses); norm-exp-train gives its own crashes 5.
USER_ERROR_EXIT = 2

F = TypeVar("F", bound=Callable[..., object])


class UserError(Exception):
    """A mistake the user can fix (a config key, a file). The message names the key or the file."""


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
