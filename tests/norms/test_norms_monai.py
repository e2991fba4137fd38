"""Our norms by name in MONAI networks."""

from __future__ import annotations

import pytest
import torch
from monai.networks.layers import get_norm_layer
from monai.networks.layers.factories import Norm
from monai.networks.nets import BasicUNet
from torch import nn

from norm_experiments.norms import BatchRenorm, FilterResponseNorm, GhostBatchNorm, register_monai_norms


def test_registration_is_idempotent_and_keeps_monai_names() -> None:
    register_monai_norms()
    names = set(Norm.names)
    register_monai_norms()
    assert set(Norm.names) == names
    assert {"NONE", "BATCHRENORM", "GHOSTBATCH", "WS_GROUP", "WEIGHTNORM", "FRN"} <= names
    assert Norm["batch", 3] is nn.BatchNorm3d
    assert Norm["instance", 3] is nn.InstanceNorm3d
    assert Norm["group", 3] is nn.GroupNorm
    assert Norm["layer", 3] is nn.LayerNorm
    assert Norm["syncbatch", 3] is nn.SyncBatchNorm


@pytest.mark.parametrize(
    ("norm", "expected"),
    [
        (("batchrenorm", {"r_max": 2.0}), BatchRenorm),
        (("ghostbatch", {"virtual_batch": 1}), GhostBatchNorm),
        ("frn", FilterResponseNorm),
        (("ws_group", {"num_groups": 4}), nn.GroupNorm),
        ("weightnorm", nn.Identity),
        ("none", nn.Identity),
    ],
)
def test_get_norm_layer_builds_ours(norm, expected) -> None:
    register_monai_norms()
    layer = get_norm_layer(norm, spatial_dims=3, channels=8)
    assert isinstance(layer, expected)
    if hasattr(layer, "num_features"):
        assert layer.num_features == 8


@pytest.mark.parametrize(
    "norm",
    [("group", {"num_groups": 4}), ("frn", {}), ("batchrenorm", {}), ("ghostbatch", {"virtual_batch": 2})],
)
def test_basic_unet_runs_with_our_norms(norm) -> None:
    register_monai_norms()
    torch.manual_seed(0)
    net = BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(8, 8, 16, 32, 64, 8), norm=norm)
    x = torch.randn(2, 1, 16, 16, 16)  # 1x1x1 bottleneck: N=2 keeps train-mode BN statistics defined
    out = net(x)
    assert out.shape == (2, 2, 16, 16, 16)
    out.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    with torch.no_grad():
        assert torch.isfinite(net.eval()(x)).all()
