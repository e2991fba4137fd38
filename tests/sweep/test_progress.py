"""The sweep's progress count (sweep/progress.py), read from its events file as the runs' processes write it."""

from __future__ import annotations

from pathlib import Path

from norm_experiments.sweep import progress


def test_a_killed_sweeps_leftover_worker_never_counts_past_the_total(tmp_path: Path) -> None:
    """After kill -9 of a joblib sweep its worker finished its run while the sweep ran again: "run 3 of 2 done
    (150 %)"."""
    progress.start(tmp_path, 2)
    assert progress.started_line(tmp_path, "norm=batch").startswith("[sweep] run 1 of 2 started: norm=batch")
    progress.started_line(tmp_path, "norm=group")
    assert "run 1 of 2 done: norm=batch  x  (50 %" in progress.finished_line(tmp_path, "norm=batch", "x")
    progress._append(tmp_path, "end norm=batch")  # the killed sweep's worker, ending the same run once more
    progress._append(tmp_path, "end norm=instance")  # and one this sweep never started
    line = progress.finished_line(tmp_path, "norm=group", "y")
    assert line.startswith("[sweep] run 2 of 2 done: norm=group  y  (100 %"), line
