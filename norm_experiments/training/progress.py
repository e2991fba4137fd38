"""Progress display: a live bar on a terminal, plain periodic log lines otherwise (multiruns, CI, files)."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("norm_experiments.train")


class Progress:
    def __init__(self, total_steps: int, start_step: int, mode: str, description: str) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode, self.total, self.start, self.description = mode, total_steps, start_step, description
        self.started = time.perf_counter()
        # Plain mode logs about 20 lines per run, enough to follow a run without flooding a sweep's log.
        self.log_every = max(1, total_steps // 20)
        self.dice: float | None = None
        # What the last step line showed: a sweep's console (sweep/progress.py) shows only the lines that
        # bring a new validation score or a new quarter of the run.
        self._logged_dice: float | None = None
        self._logged_quarter = 4 * start_step // max(total_steps, 1)
        self.loss: float | None = None  # the loss of the last logging step: reading it syncs with the GPU
        self._bar = None
        if mode == "bar":
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn(description),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._task = self._bar.add_task("train", total=total_steps, completed=start_step, info="")
            self._bar.start()

    def update(self, step: int, loss: float | None) -> None:
        """Called after each step (1-based count of finished steps). `loss` is given only at logging steps
        (trainer.log_every_steps), where the loop reads it anyway; in between, the last one is shown."""
        if loss is not None:
            self.loss = loss
        info = f"loss {self.loss:.4f}" if self.loss is not None else ""
        if self.dice is not None:
            info += f"  val dice {self.dice:.3f}"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        elif self.mode == "log" and (step % self.log_every == 0 or step == self.total):
            done = step - self.start
            elapsed = time.perf_counter() - self.started
            eta = elapsed / max(done, 1) * (self.total - step)
            quarter = 4 * step // self.total
            extra = {"status_line": self.dice != self._logged_dice or quarter > self._logged_quarter}
            self._logged_dice, self._logged_quarter = self.dice, quarter
            log.info(
                "%s step %d/%d  %s  eta %.0fs", self.description, step, self.total, info, eta, extra=extra
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
