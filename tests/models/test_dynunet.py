"""model=dynunet: nnU-Net's plan (kernels and strides from patch size and spacing), every registered norm
trained through the real entry point at batch 1, and the plans DynUNet cannot take refused with one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.networks.blocks.dynunet_block import UnetBasicBlock
from monai.networks.nets import DynUNet

from norm_experiments.errors import UserError
from norm_experiments.models import build_model, median_spacing, model_levels
from norm_experiments.models.dynunet import plan
from norm_experiments.models.preflight import level_shapes, preflight
from norm_experiments.norms import make_norm_spec, registry
from norm_experiments.norms.weight_std import WSConv3d
from norm_experiments.training.loop import train
from tests.helpers import assert_clean_failure, compose_config, run_cli

# Subprocess runs of the real CLI or trainings: the full suite runs them, `pytest -m "not slow"` does not.
pytestmark = pytest.mark.slow

TINY = [
    "experiment=smoke",
    "model=dynunet",
    "model.base_channels=8",  # 8, 16, 32: divisible by the default groups of norm=group
    "trainer.samples=4",
    "trainer.validations=1",
    "trainer.num_threads=1",
]


@pytest.mark.parametrize(
    ("patch", "spacing", "kernels", "strides"),
    [
        # isotropic: every axis halved while >= 8 voxels (16 -> 8 -> 4)
        ([16, 16, 16], [1, 1, 1], [[3, 3, 3]] * 3, [[1, 1, 1], [2, 2, 2], [2, 2, 2]]),
        # thick slices (3 mm vs 1 mm): kernel 1 and stride 1 across slices until in-plane catches up (2 mm)
        (
            [16, 64, 64],
            [3, 1, 1],
            [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
            [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
        ),
        # exactly twice as coarse counts as anisotropic (nnU-Net: ratio < 2); one axis left needs >= 12 voxels
        ([16, 16, 16], [2, 1, 1], [[1, 3, 3], [3, 3, 3], [3, 3, 3]], [[1, 1, 1], [1, 2, 2], [2, 2, 2]]),
        # an axis shorter than 8 voxels is never downsampled
        ([4, 32, 32], [1, 1, 1], [[3, 3, 3]] * 4, [[1, 1, 1], [1, 2, 2], [1, 2, 2], [1, 2, 2]]),
    ],
)
def test_plan_follows_nnunet_rule(patch, spacing, kernels, strides) -> None:
    assert plan(patch, spacing, max_depth=5) == (kernels, strides)


def test_plan_stops_at_max_depth() -> None:
    kernels, strides = plan([128, 128, 128], [1, 1, 1], max_depth=3)
    assert len(strides) == 4 and len(kernels) == 4  # input block + 3 downsamplings, bottleneck last


def test_built_network_matches_the_plan_and_the_norm() -> None:
    cfg = compose_config([*TINY, "data.patch_size=[16,64,64]", "norm=ws_group"])
    spec = make_norm_spec("ws_group")
    net = build_model(cfg.model, spec, 1, 3, spacing=[3.0, 1.0, 1.0])
    assert isinstance(net, DynUNet) and not net.deep_supervision
    assert net.strides == [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
    blocks = [m for m in net.modules() if isinstance(m, UnetBasicBlock)]
    assert all(isinstance(b.conv1.conv, WSConv3d) for b in blocks)  # the norm's own conv everywhere
    assert all(b.conv1.conv.bias is None for b in blocks)  # GroupNorm has a shift: no conv bias
    assert blocks[0].conv1.conv.kernel_size == (1, 3, 3)  # the plan's anisotropic first kernel
    norms = [type(m).__name__ for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 2 * len(blocks)
    out = net(torch.randn(1, 1, 16, 64, 64))
    assert out.shape == (1, 3, 16, 64, 64)


def test_frn_gets_no_second_activation() -> None:
    cfg = compose_config([*TINY, "norm=frn"])
    net = build_model(cfg.model, make_norm_spec("frn"), 1, 2)
    assert not any(isinstance(m, torch.nn.LeakyReLU) for m in net.modules())


@pytest.mark.parametrize("norm", registry.names())
def test_every_norm_trains_dynunet_at_batch_1(norm: str, tmp_path: Path) -> None:
    cfg = compose_config([*TINY, f"norm={norm}", "data.batch_size=1"])
    metrics = train(cfg, tmp_path)
    assert metrics["status"] == "completed" and metrics["model"] == "dynunet"
    assert metrics["effective_batch"] == 1 and metrics["steps"] == 4
    assert set(metrics.get("eval_modes", {})) == set(registry.get(norm).eval_modes)
    assert 0.0 <= metrics["val_dice"] <= 1.0


def test_bottleneck_at_batch_1_passes_preflight_for_every_norm() -> None:
    """nnU-Net's rule stops halving an axis below 8 voxels, so the bottleneck of a 16^3 patch keeps 4^3
    values per channel: BatchNorm at batch 1 and InstanceNorm both have statistics over more than one."""
    model = compose_config(TINY).model
    levels = model_levels(model, [16, 16, 16])
    assert level_shapes([16, 16, 16], levels)[-1] == [4, 4, 4]
    for norm in registry.names():
        preflight(make_norm_spec(norm), model, [16, 16, 16], effective_batch=1)


def test_preflight_refuses_a_patch_dynunet_cannot_plan() -> None:
    model = compose_config(TINY).model
    with pytest.raises(UserError, match="fewer than two downsamplings"):
        preflight(make_norm_spec("batch"), model, [8, 8, 8], effective_batch=1)
    with pytest.raises(UserError, match=r"divisible by \[4, 4, 4\]; e.g. data.patch_size=\[20, 16, 16\]"):
        preflight(make_norm_spec("batch"), model, [18, 16, 16], effective_batch=1)


def test_cli_refuses_a_too_small_patch_with_one_line(tmp_path: Path) -> None:
    result = run_cli([*TINY, "norm=batch", "data.batch_size=1", "data.patch_size=[8,8,8]"], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert_clean_failure(result)
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model=dynunet" in errors[0] and "data.patch_size" in errors[0]
    assert not list(tmp_path.rglob("model.pt"))


def test_median_spacing_is_per_axis() -> None:
    class V:
        def __init__(self, s):
            self.spacing = s

    assert median_spacing([V((1, 2, 5)), V((1, 1, 3)), V((2, 1, 4))]) == [1.0, 1.0, 4.0]
