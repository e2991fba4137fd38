"""SIGTERM/SIGINT during training: finish the current step, save a checkpoint, stop cleanly."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint after the current step and stops.

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
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            # After a stop request the process is on its way out with exit status 3: a further signal while
            # it exits must not turn into a KeyboardInterrupt traceback, so the handlers stay.
            if not self.requested:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
