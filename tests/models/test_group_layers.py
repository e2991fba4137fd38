"""GroupNorm in every study preset is neither InstanceNorm (one channel per group) nor LayerNorm (one group)
at any layer: otherwise "GroupNorm vs InstanceNorm" would partly compare a norm with itself."""

from __future__ import annotations

import pytest
from torch import nn

from norm_experiments.config import CONFIG_DIR
from norm_experiments.models import build_model
from norm_experiments.norms import make_norm_spec
from norm_experiments.training.record import group_layers
from tests.helpers import compose_config

PRESETS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))


def _group_norms(overrides: list[str]) -> list[nn.GroupNorm]:
    cfg = compose_config(overrides)
    spec = make_norm_spec(cfg.norm.name, **cfg.norm.options)
    model = build_model(cfg.model, spec, in_channels=1, out_channels=3, spacing=[3.0, 3.0, 3.0])
    return [m for m in model.modules() if isinstance(m, nn.GroupNorm)]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("norm", ["group", "ws_group"])
def test_no_group_norm_layer_of_a_preset_is_instance_or_layer_norm(preset, norm):
    layers = _group_norms([f"experiment={preset}", f"norm={norm}"])
    assert layers, f"experiment={preset} norm={norm} built no GroupNorm layer"
    for layer in layers:
        per_group = layer.num_channels // layer.num_groups
        assert layer.num_groups >= 2, f"{preset}: a layer of {layer.num_channels} channels has one group"
        assert per_group >= 2, f"{preset}: a layer of {layer.num_channels} channels has one channel per group"


@pytest.mark.parametrize("model", MODELS)
def test_group_norm_of_every_model_with_default_options_is_distinct(model):
    for layer in _group_norms([f"model={model}", "norm=group"]):
        assert layer.num_groups >= 2 and layer.num_channels // layer.num_groups >= 2


def test_the_record_says_how_the_channels_are_grouped():
    model = nn.Sequential(nn.GroupNorm(4, 8), nn.Conv3d(8, 16, 1), nn.GroupNorm(4, 32), nn.GroupNorm(1, 16))
    assert group_layers(model) == {"layers": 3, "groups": [1, 4], "channels_per_group": [2, 16]}
    assert group_layers(nn.Sequential(nn.BatchNorm3d(4))) is None
