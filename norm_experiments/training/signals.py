"""SIGTERM/SIGINT during a run: stop at the next stop point of whatever phase runs, save a checkpoint, exit 3.

A signal only sets a flag (StopRequest); the run acts on it at stop points, which every long phase passes
often: after each training step (training/loop.py), before each forward of sliding-window inference and
before each volume (validation, the final evaluation in every BatchNorm evaluation mode, the label maps of
trainer.save_predictions), before each PreciseBN batch (training/evaluate.py, training/predictions.py). A stop
point raises RunInterrupted, which the run turns into a checkpoint and an `interrupted` record (Run.stopped).
What a phase left half done is redone by the resumed run from the checkpoint's state (a validation whose
entry is missing from the history, the whole final evaluation), so its record equals an uninterrupted run's.

A training step is never cut: BatchNorm's running statistics change with every micro-batch's forward, so a
step either happened (and the checkpoint holds it) or did not. Under torchrun the ranks must stop at the same
point, or one would wait forever in a collective the others left: there the in-phase stop points do nothing,
and the ranks agree at the collective ones (stop_point_all_ranks: after each step, between evaluation modes,
before and between the prediction modes, before the record).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from norm_experiments.training import distributed


class RunInterrupted(Exception):
    """SIGTERM or SIGINT arrived; the run stops (Run.stopped saves a checkpoint). The message names the
    phase it stopped in."""


# The request installed by the running training run (None outside one: norm-exp-check, tests), and the phase
# the run is in, named in the line that says where it stopped.
_installed: StopRequest | None = None
_phase = "training"


class StopRequest:
    """SIGTERM/SIGINT set a flag; the run stops at the next stop point (see the module docstring).

    Keep it installed until the checkpoint and the run's record are written: further signals while the run
    stops are then ignored, so the first one's checkpoint-and-exit finishes whatever follows (a second
    Ctrl-C used to interrupt the save and leave the record saying `running`). kill -9 still stops at once.
    Under torchrun a second signal is expected anyway (torchrun forwards the one it got to every rank);
    torchrun kills ranks that have not exited 30 s after forwarding."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum, frame) -> None:
        self.requested = True

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        global _installed
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        outer, _installed = _installed, self
        try:
            yield self
        finally:
            _installed = outer
            # After a stop request the process is on its way out with exit status 3: a further signal while
            # it exits must not turn into a KeyboardInterrupt traceback, so the handlers stay.
            if not self.requested:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """The run is in phase `name` (validation, PreciseBN, predictions...): a stop in it says so, with the
    phase it is part of ("PreciseBN in predictions")."""
    global _phase
    outer = _phase
    _phase = name if outer == "training" else f"{name} in {outer}"
    try:
        yield
    finally:
        _phase = outer


def current_phase() -> str:
    return _phase


def stop_point() -> None:
    """Raise RunInterrupted if SIGTERM/SIGINT asked the running run to stop. In one process only: under
    torchrun the ranks stop together at stop_point_all_ranks instead (see the module docstring)."""
    if _installed is not None and _installed.requested and not distributed.is_distributed():
        raise RunInterrupted(_phase)


def stop_point_all_ranks() -> None:
    """Raise RunInterrupted on every rank if the request reached any of them. Collective: every rank must
    call it at the same point of the run."""
    if _installed is not None and distributed.any_rank(_installed.requested):
        raise RunInterrupted(_phase)
