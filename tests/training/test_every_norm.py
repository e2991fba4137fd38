"""Every norm trains a smoke run at batch sizes 1 and 2 (the real config, composed as the CLI would),
MONAI's BasicUNet trains with our norms, and the pre-flight check catches one-value-per-channel layers."""

from __future__ import annotations

from pathlib import Path

import pytest

from norm_experiments.errors import UserError
from norm_experiments.models.preflight import preflight
from norm_experiments.norms import make_norm_spec, registry
from norm_experiments.training.loop import train
from tests.helpers import compose_config, metrics_of

# Subprocess runs of the real CLI or trainings: the full suite runs them, `pytest -m "not slow"` does not.
pytestmark = pytest.mark.slow

FAST = ["experiment=smoke", "trainer.samples=4", "trainer.validations=1", "trainer.num_threads=1"]


@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("norm", registry.names())
def test_every_norm_trains_at_batch_1_and_2(norm: str, batch_size: int, tmp_path: Path) -> None:
    cfg = compose_config([*FAST, f"norm={norm}", f"data.batch_size={batch_size}"])
    metrics = train(cfg, tmp_path)
    assert metrics["status"] == "completed"
    assert metrics["norm"] == norm and metrics["effective_batch"] == batch_size
    assert metrics["samples_seen"] == 4 and metrics["steps"] == 4 // batch_size
    per_class = list(metrics["val_dice_per_class"].values())
    assert metrics["val_dice"] == pytest.approx(sum(per_class) / len(per_class))
    assert metrics["history"][-1]["val_dice"] == metrics["val_dice"]
    assert set(metrics.get("eval_modes", {})) == set(registry.get(norm).eval_modes)
    assert metrics_of(tmp_path)["status"] == "completed"


@pytest.mark.parametrize("norm", registry.names())
def test_monai_basic_unet_trains_with_every_norm(norm: str, tmp_path: Path) -> None:
    # 32^3: BasicUNet downsamples 4 times, and InstanceNorm needs more than one voxel at the bottleneck
    overrides = [*FAST, "model=basic_unet", f"norm={norm}", "data.batch_size=2", "data.patch_size=[32,32,32]"]
    metrics = train(compose_config(overrides), tmp_path)
    assert metrics["status"] == "completed" and metrics["model"] == "basic_unet"


def test_preflight_one_by_one_by_one_bottleneck() -> None:
    model = compose_config(["experiment=smoke"]).model  # depth 2: an 4^3 patch has a 1^3 bottleneck
    for norm in ("batch", "instance"):
        with pytest.raises(UserError, match="level 2"):
            preflight(make_norm_spec(norm), model, [4, 4, 4], effective_batch=1)
    preflight(make_norm_spec("group"), model, [4, 4, 4], effective_batch=2)  # accepted
    preflight(make_norm_spec("batch"), model, [4, 4, 4], effective_batch=2)  # 2 values per channel: fine
    with pytest.raises(UserError, match="data.patch_size"):
        preflight(make_norm_spec("group"), model, [6, 6, 6], effective_batch=2)  # not divisible by 4
