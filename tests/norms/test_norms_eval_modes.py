"""bn_eval_mode, recompute_bn_statistics (PreciseBN) and BNStatMonitor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from norm_experiments.errors import UserError
from norm_experiments.norms import (
    BatchRenorm,
    BNStatMonitor,
    GhostBatchNorm,
    bn_eval_mode,
    is_batch_stat_layer,
    recompute_bn_statistics,
)

ATOL = 1e-5


def shifted_volumes(sizes: list[int], channels: int = 3) -> list[torch.Tensor]:
    """Batches of volumes with different intensity offsets and scales, like scans from different scanners."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for size in sizes:
        scale = torch.rand(size, 1, 1, 1, 1, generator=generator) * 3 + 0.5
        offset = torch.randn(size, 1, 1, 1, 1, generator=generator) * 4
        batches.append(torch.randn(size, channels, 4, 5, 3, generator=generator) * scale + offset)
    return batches


def with_random_running_stats(*layers: nn.Module) -> None:
    with torch.no_grad():
        for layer in layers:
            layer.running_mean.uniform_(-2, 2)
            layer.running_var.uniform_(0.5, 3)
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)


def running_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_bn_eval_mode_batch_uses_batch_statistics_without_updating_them() -> None:
    bn, renorm, ghost = nn.BatchNorm3d(3), BatchRenorm(3), GhostBatchNorm(3, virtual_batch=1)
    with_random_running_stats(bn, renorm, ghost)
    model = nn.Sequential(bn, nn.Dropout(0.5), renorm, ghost).train()
    renorm.set_progress(1.0)  # relaxed r/d must not matter: batch mode is plain batch statistics
    x = shifted_volumes([2])[0]
    before = running_state(model)

    h = F.batch_norm(x, None, None, bn.weight, bn.bias, training=True)  # dropout is off in eval
    h = F.batch_norm(h, None, None, renorm.weight, renorm.bias, training=True)
    expected = F.instance_norm(h, weight=ghost.weight, bias=ghost.bias)  # virtual batches of 1 sample
    with torch.no_grad(), bn_eval_mode(model, "batch"):
        out = model(x)
        assert not model.training and not model[1].training
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)
    for key, value in running_state(model).items():
        assert torch.equal(value, before[key]), key
    assert model.training and all(m.training for m in model)
    assert all(m.track_running_stats for m in model if is_batch_stat_layer(m))


def test_bn_eval_mode_running_is_model_eval_and_restores_flags() -> None:
    model = nn.Sequential(nn.BatchNorm3d(3), nn.Dropout(0.5))
    with_random_running_stats(model[0])
    model.train()
    model[1].eval()  # a mixed state must come back as it was
    x = shifted_volumes([2])[0]
    with torch.no_grad(), bn_eval_mode(model, "running"):
        out = model(x)
    expected = F.batch_norm(x, model[0].running_mean, model[0].running_var, model[0].weight, model[0].bias)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)
    assert model.training and model[0].training and not model[1].training
    with pytest.raises(UserError, match="running, batch"):
        with bn_eval_mode(model, "train"):
            pass


def population_stats(batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    joined = torch.cat(batches).transpose(0, 1).flatten(1)
    return joined.mean(1), joined.var(1, unbiased=True)


def test_recompute_bn_statistics_gives_population_statistics() -> None:
    torch.manual_seed(0)
    conv1, bn1 = nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4, momentum=0.3)
    conv2, bn2 = nn.Conv3d(4, 4, 1), GhostBatchNorm(4, virtual_batch=2)
    model = nn.Sequential(conv1, bn1, nn.ReLU(), nn.Dropout(0.5), conv2, bn2).eval()
    with_random_running_stats(bn1, bn2)
    batches = shifted_volumes([1, 2, 3])  # unequal batch sizes: averaging batch means would be wrong

    with torch.no_grad():
        inputs1 = [conv1(x) for x in batches]
        # bn2 sees features normalized with each batch's statistics (as in training), without dropout.
        inputs2 = [conv2(F.relu(F.batch_norm(h, None, None, bn1.weight, bn1.bias, True))) for h in inputs1]
    used = recompute_bn_statistics(model, iter(batches), torch.device("cpu"))

    assert used == 3
    for layer, inputs in ((bn1, inputs1), (bn2, inputs2)):
        mean, var = population_stats(inputs)
        torch.testing.assert_close(layer.running_mean, mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.running_var, var, atol=1e-5, rtol=1e-5)
        assert int(layer.num_batches_tracked) == 3
    assert bn1.momentum == 0.3 and bn2.momentum == 0.1
    assert not model.training and not any(m.training for m in model)
    assert all(m.track_running_stats for m in (bn1, bn2))


def test_recompute_bn_statistics_without_bn_layers_returns_zero() -> None:
    model = nn.Sequential(nn.Conv3d(3, 4, 1), nn.GroupNorm(2, 4))
    assert recompute_bn_statistics(model, shifted_volumes([1]), "cpu") == 0


def test_bn_stat_monitor_reports_gap_between_batch_and_running_stats() -> None:
    model = nn.Sequential(nn.BatchNorm3d(3), nn.ReLU(), nn.BatchNorm3d(3))
    with_random_running_stats(model[0], model[2])
    monitor = BNStatMonitor(model)
    batches = shifted_volumes([2, 1])
    expected_mean_gap, expected_var_gap = [], []
    model.train()
    for x in batches:
        running_mean, running_var = model[0].running_mean.clone(), model[0].running_var.clone()
        mean, var = population_stats([x])
        expected_mean_gap.append(((mean - running_mean).abs() / torch.sqrt(running_var + 1e-5)).mean())
        expected_var_gap.append(((var - running_var).abs() / (running_var + 1e-5)).mean())
        model(x)
    gaps = monitor.pop()
    assert set(gaps) == {"0/mean_gap", "0/var_gap", "2/mean_gap", "2/var_gap"}
    assert gaps["0/mean_gap"] == pytest.approx(torch.stack(expected_mean_gap).mean().item(), rel=1e-5)
    assert gaps["0/var_gap"] == pytest.approx(torch.stack(expected_var_gap).mean().item(), rel=1e-5)
    assert monitor.pop() == {}
    with torch.no_grad(), bn_eval_mode(model, "batch"):
        model(batches[0])
    model.eval()(batches[0])
    assert monitor.pop() == {}  # only train-mode forwards that update running stats count
    monitor.close()
    model.train()(batches[0])
    assert monitor.pop() == {}
