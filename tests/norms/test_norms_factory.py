"""NormSpec construction, validation messages, conv/norm wiring and the configs/norm files."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from norm_experiments.errors import UserError
from norm_experiments.norms import (
    BatchRenorm,
    FilterResponseNorm,
    GhostBatchNorm,
    PortableSyncBatchNorm,
    WSConv3d,
    check_channels,
    is_batch_stat_layer,
    make_norm_spec,
    registry,
)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "norm"

# One row per norm: what it must build and be. Adding a norm = its module, its config file and a row here
# (test_every_registered_norm_has_a_row fails until the row exists).
# name: (norm layer type, conv type, conv has bias, batch-dependent, keeps running stats, its own activation)
EXPECTED = {
    "batch": (nn.BatchNorm3d, nn.Conv3d, False, True, True, False),
    "batchrenorm": (BatchRenorm, nn.Conv3d, False, True, True, False),
    "frn": (FilterResponseNorm, nn.Conv3d, False, False, False, True),
    "ghostbatch": (GhostBatchNorm, nn.Conv3d, False, True, True, False),
    "group": (nn.GroupNorm, nn.Conv3d, False, False, False, False),
    "instance": (nn.InstanceNorm3d, nn.Conv3d, False, False, False, False),
    "layer": (nn.GroupNorm, nn.Conv3d, False, False, False, False),
    "none": (nn.Identity, nn.Conv3d, True, False, False, False),
    "syncbatch": (PortableSyncBatchNorm, nn.Conv3d, False, True, True, False),
    "weightnorm": (nn.Identity, nn.Conv3d, True, False, False, False),
    "ws_group": (nn.GroupNorm, WSConv3d, False, False, False, False),
}
NAMES = registry.names()


def test_every_registered_norm_has_a_row() -> None:
    assert set(NAMES) == set(EXPECTED)


def block(name: str, **options) -> nn.Module:
    spec = make_norm_spec(name, **options)
    layers = [spec.conv(2, 8), spec.norm(8)]
    if not spec.includes_activation:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_every_norm_runs_forward_and_backward(name: str, batch_size: int) -> None:
    torch.manual_seed(0)
    grouped = registry.get(name).groups_option
    model = block(name, **{grouped: 4}) if grouped else block(name)
    x = torch.randn(batch_size, 2, 6, 5, 4, requires_grad=True)
    y = model(x)
    assert y.shape == (batch_size, 8, 6, 5, 4)
    y.square().mean().backward()
    grads = [p.grad for p in model.parameters()] + [x.grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("name", NAMES)
def test_norm_type_conv_bias_and_flags(name: str) -> None:
    layer, conv_type, conv_bias, batch_dependent, running_stats, activation = EXPECTED[name]
    spec = make_norm_spec(name)
    assert type(spec.norm(8)) is layer
    conv = spec.conv(4, 8)
    assert isinstance(conv, conv_type) and (conv.bias is not None) == conv_bias
    assert conv.padding == (1, 1, 1)
    assert spec.uses_batch_statistics == batch_dependent
    assert spec.bn_family == running_stats == is_batch_stat_layer(spec.norm(8))
    assert spec.includes_activation == activation
    assert (spec.bn_batch(2, 4) is not None) == batch_dependent


def test_conv_arguments_and_instance_without_affine_keeps_bias() -> None:
    conv = make_norm_spec("batch").conv(4, 8, kernel_size=1, stride=2)
    assert conv.kernel_size == (1, 1, 1) and conv.stride == (2, 2, 2) and conv.padding == (0, 0, 0)
    assert make_norm_spec("instance", affine=False).conv(4, 8).bias is not None
    norm = make_norm_spec("instance", affine=False, track_running_stats=True).norm(8)
    assert not norm.affine and norm.track_running_stats


def test_options_get_defaults_and_spec_pickles() -> None:
    spec = make_norm_spec("batchrenorm", r_max=2)
    assert spec.options["r_max"] == 2.0 and spec.options["d_max"] == 5.0
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert hash(spec) == hash(make_norm_spec("batchrenorm"))
    assert make_norm_spec("batch", momentum=None).norm(4).momentum is None


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(
        UserError, match=r"unknown normalization 'batchnrom'; did you mean 'batch'\? valid: batch"
    ):
        make_norm_spec("batchnrom")


@pytest.mark.parametrize(
    ("name", "options", "key"),
    [
        ("group", {"num_groups": 0}, "norm.options.num_groups"),
        ("group", {"num_groups": 2.5}, "norm.options.num_groups"),
        ("ghostbatch", {"virtual_batch": 0}, "norm.options.virtual_batch"),
        ("batchrenorm", {"r_max": 0.5}, "norm.options.r_max"),
        ("batchrenorm", {"d_max": -1}, "norm.options.d_max"),
        ("batchrenorm", {"warmup_fraction": 0.6}, "norm.options.warmup_fraction"),
        ("batch", {"eps": 0}, "norm.options.eps"),
        ("batch", {"eps": True}, "norm.options.eps"),
        ("batch", {"momentum": 1.5}, "norm.options.momentum"),
        ("instance", {"affine": "yes"}, "norm.options.affine"),
        ("batch", {"num_groups": 4}, "norm.options.num_groups"),
        ("none", {"eps": 1e-5}, "norm.options.eps"),
    ],
)
def test_bad_options_name_the_key(name: str, options: dict, key: str) -> None:
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        make_norm_spec(name, **options)


def test_group_norm_that_does_not_divide_names_num_groups() -> None:
    spec = make_norm_spec("group", num_groups=3)
    with pytest.raises(UserError, match=r"norm\.options\.num_groups=3 does not divide 8 channels"):
        spec.norm(8)


def test_check_channels_names_key_level_and_divisors() -> None:
    check_channels(make_norm_spec("group", num_groups=8), [8, 16, 32])
    check_channels(make_norm_spec("batch"), [3, 5])
    with pytest.raises(UserError) as err:
        check_channels(make_norm_spec("ws_group", num_groups=3), [8, 16, 32])
    message = str(err.value)
    assert "norm.options.num_groups=3 does not divide 8 channels (level 0)" in message
    assert "8, 16, 32" in message and "1, 2, 4, 8" in message
    with pytest.raises(UserError, match=r"does not divide 20 channels \(level 1\)"):
        check_channels(make_norm_spec("group", num_groups=8), [8, 20])


def test_config_files_match_norm_names_and_build() -> None:
    files = sorted(CONFIG_DIR.glob("*.yaml"))
    assert {f.stem for f in files} == set(NAMES)
    for path in files:
        cfg = OmegaConf.load(path)
        assert cfg.name == path.stem
        options = OmegaConf.to_container(cfg.options)
        spec = make_norm_spec(cfg.name, **cfg.options)  # as the training code calls it
        # The YAML names every option of the record and sets each to the record's default: a changed default
        # in one of the two places fails here.
        assert set(options) == set(registry.get(cfg.name).options), path.name
        assert spec.options == make_norm_spec(cfg.name).options, path.name
        assert all(isinstance(v, (bool, int, float, type(None))) for v in spec.options.values())
        for line in path.read_text().splitlines():
            if ":" in line and not line.lstrip().startswith("#"):
                assert "#" in line, f"{path.name}: key without a comment: {line!r}"
