"""Hydra finds sweepers only in the hydra_plugins namespace: this names norm-experiments' study sweeper there.
The code is norm_experiments/sweep/study.py."""

from norm_experiments.sweep.study import StudySweeper as _StudySweeper


class StudySweeper(_StudySweeper):
    """hydra/sweeper=study (configs/hydra/sweeper/study.yaml)."""
