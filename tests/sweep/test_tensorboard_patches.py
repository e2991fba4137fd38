"""The run writer logs at x = training patches seen; a resumed run's writer discards what the killed attempt
logged after its checkpoint, in those same units."""

from __future__ import annotations

import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from norm_experiments.training.tensorboard import open_writer


def test_resume_purges_points_after_the_checkpoint_in_patches(tmp_path: Path) -> None:
    first = open_writer(tmp_path, None, patches_per_step=4)
    for step, value in ((1, 0.1), (2, 0.2), (3, 0.3)):  # killed after step 3, checkpoint at step 2
        first.add_scalar("Validation/dice_mean", value, step)
    first.close()
    time.sleep(1.1)  # event file names carry the second: the resumed attempt's file sorts after
    resumed = open_writer(tmp_path, resume_step=2, patches_per_step=4)
    for step, value in ((3, 0.35), (4, 0.4)):
        resumed.add_scalar("Validation/dice_mean", value, step)
    resumed.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    points = [(e.step, round(e.value, 3)) for e in acc.Scalars("Validation/dice_mean")]
    # x = step x 4 patches; the checkpoint's step 2 stays, the killed attempt's step 3 is replaced
    assert points == [(4, 0.1), (8, 0.2), (12, 0.35), (16, 0.4)]
