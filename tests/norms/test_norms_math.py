"""Each norm against its defining formula, or against the PyTorch layer it must equal."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from norm_experiments.norms import (
    BatchRenorm,
    FilterResponseNorm,
    GhostBatchNorm,
    RenormSchedule,
    make_norm_spec,
    renorm_diagnostics,
    set_renorm_progress,
)
from norm_experiments.norms.weight_std import standardize_filters

ATOL = 1e-5


def volume(n: int = 2, c: int = 4, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Per-channel offsets and scales, so that statistics matter.
    offsets = torch.randn(1, c, 1, 1, 1, generator=generator) * 3
    return torch.randn(n, c, 5, 4, 6, generator=generator) * 2 + offsets


def randomize_affine(*layers: nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    weight, bias = (
        torch.rand(layers[0].weight.shape, generator=generator) + 0.5,
        torch.randn(layers[0].bias.shape),
    )
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)


def assert_same_as_batchnorm(layer: nn.Module, batches: list[torch.Tensor]) -> None:
    """Train outputs, input gradients, running stats after each batch, and eval output equal BatchNorm3d."""
    reference = nn.BatchNorm3d(layer.num_features, momentum=layer.momentum)
    randomize_affine(layer, reference)
    for x in batches:
        x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, expected = layer.train()(x_ours), reference.train()(x_ref)
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)
        (out * x).sum().backward()
        (expected * x).sum().backward()
        torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer.running_mean, reference.running_mean, atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(layer.running_var, reference.running_var, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad, atol=1e-4, rtol=1e-4)
    x = volume(seed=9)
    torch.testing.assert_close(layer.eval()(x), reference.eval()(x), atol=ATOL, rtol=ATOL)


def test_batchrenorm_with_rmax_1_dmax_0_is_batchnorm() -> None:
    layer = BatchRenorm(4, schedule=RenormSchedule(r_max=1.0, d_max=0.0))
    set_renorm_progress(layer, 1.0)
    assert (layer.r_max, layer.d_max) == (1.0, 0.0)
    assert_same_as_batchnorm(layer, [volume(seed=s) for s in range(3)])


def test_batchrenorm_schedule_is_plain_bn_then_linear() -> None:
    schedule = RenormSchedule(r_max=3.0, d_max=5.0, warmup_fraction=0.1, relax_end_fraction=0.5)
    assert schedule.limits(0.0) == (1.0, 0.0)
    assert schedule.limits(0.09) == (1.0, 0.0)
    assert schedule.limits(0.3) == pytest.approx((2.0, 2.5))
    assert schedule.limits(0.5) == (3.0, 5.0)
    assert schedule.limits(1.0) == (3.0, 5.0)
    model = nn.Sequential(
        make_norm_spec("batchrenorm").norm(4), nn.ReLU(), make_norm_spec("batchrenorm").norm(4)
    )
    set_renorm_progress(model, 0.3)
    limits = [(m.r_max, m.d_max) for m in model if isinstance(m, BatchRenorm)]
    assert limits == [pytest.approx((2.0, 2.5))] * 2


def reference_batch_renorm(x, weight, bias, running_mean, running_var, eps, r_max, d_max):
    """The paper's formula written out directly, with explicit stop-gradients."""
    dims = (0, 2, 3, 4)
    mean = x.mean(dims, keepdim=True)
    std = torch.sqrt(x.var(dims, unbiased=False, keepdim=True) + eps)
    running_std = torch.sqrt(running_var + eps).view(1, -1, 1, 1, 1)
    raw_r = (std / running_std).detach()
    raw_d = ((mean - running_mean.view(1, -1, 1, 1, 1)) / running_std).detach()
    r, d = raw_r.clamp(1 / r_max, r_max), raw_d.clamp(-d_max, d_max)
    x_hat = (x - mean) / std * r + d
    clipped = (raw_r.flatten() > r_max) | (raw_r.flatten() < 1 / r_max) | (raw_d.flatten().abs() > d_max)
    return weight.view(1, -1, 1, 1, 1) * x_hat + bias.view(1, -1, 1, 1, 1), r.flatten(), d.flatten(), clipped


def test_batchrenorm_relaxed_clips_r_and_d_without_gradient_through_them() -> None:
    layer = BatchRenorm(4, schedule=RenormSchedule(r_max=1.5, d_max=0.5, warmup_fraction=0.0))
    set_renorm_progress(layer, 1.0)
    randomize_affine(layer)
    x = volume(n=2)
    batch_var, batch_mean = torch.var_mean(x, dim=(0, 2, 3, 4), correction=0)
    with torch.no_grad():
        # Channel 0 matches the batch (r = 1, d = 0), channel 3 is within the limits, channels 1 and 2
        # clip both r and d.
        layer.running_mean.copy_(batch_mean + torch.tensor([0.0, 5.0, -5.0, 0.1]))
        layer.running_var.copy_(batch_var * torch.tensor([1.0, 4.0, 0.25, 1.1]))
    running_mean, running_var = layer.running_mean.clone(), layer.running_var.clone()
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    weight_ref, bias_ref = layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone()
    expected, r, d, clipped = reference_batch_renorm(
        x_ref, weight_ref, bias_ref, running_mean, running_var, 1e-5, 1.5, 0.5
    )
    out = layer.train()(x_ours)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)
    assert clipped.tolist() == [False, True, True, False]
    assert r[1] == 1 / 1.5 and r[2] == 1.5 and d[1].abs() == 0.5 and d[2].abs() == 0.5
    upstream = torch.randn_like(x)
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.weight.grad, weight_ref.grad, atol=1e-4, rtol=1e-4)
    # Running statistics still move as in BatchNorm.
    torch.testing.assert_close(layer.running_mean, 0.9 * running_mean + 0.1 * batch_mean)
    torch.testing.assert_close(layer.running_var, 0.9 * running_var + 0.1 * x.var((0, 2, 3, 4)))
    # Diagnostics report the clipping of this forward.
    diagnostics = renorm_diagnostics(nn.Sequential(layer))
    assert diagnostics["0/clip_fraction"] == clipped.float().mean().item()
    assert abs(diagnostics["0/r_mean"] - r.mean().item()) < 1e-6
    assert abs(diagnostics["0/d_abs_mean"] - d.abs().mean().item()) < 1e-6
    assert diagnostics["0/r_max"] == 1.5 and diagnostics["0/d_max"] == 0.5


def test_batchnorm_at_batch_size_1_is_instance_norm() -> None:
    x = volume(n=1)
    expected = nn.InstanceNorm3d(4, affine=False)(x)
    torch.testing.assert_close(nn.BatchNorm3d(4).train()(x), expected, atol=ATOL, rtol=ATOL)


def test_group_norm_with_one_group_per_channel_is_affine_instance_norm() -> None:
    group, instance = nn.GroupNorm(4, 4), nn.InstanceNorm3d(4, affine=True)
    randomize_affine(group, instance)
    x = volume()
    torch.testing.assert_close(group(x), instance(x), atol=ATOL, rtol=ATOL)


def test_layer_is_group_norm_with_one_group() -> None:
    layer, group = make_norm_spec("layer").norm(4), nn.GroupNorm(1, 4)
    randomize_affine(layer, group)
    x = volume()
    torch.testing.assert_close(layer(x), group(x), atol=ATOL, rtol=ATOL)
    dims = (1, 2, 3, 4)
    manual = (x - x.mean(dims, keepdim=True)) / torch.sqrt(x.var(dims, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(nn.GroupNorm(1, 4)(x), manual, atol=ATOL, rtol=ATOL)


def test_ghost_batch_with_virtual_batch_equal_to_batch_is_batchnorm() -> None:
    assert_same_as_batchnorm(GhostBatchNorm(4, virtual_batch=2), [volume(n=2, seed=s) for s in range(3)])
    assert_same_as_batchnorm(GhostBatchNorm(4, virtual_batch=8), [volume(n=3, seed=s) for s in range(2)])


def test_ghost_batch_with_virtual_batch_1_uses_per_sample_statistics() -> None:
    layer = GhostBatchNorm(4, virtual_batch=1, momentum=0.1)
    randomize_affine(layer)
    x = volume(n=3)
    out = layer.train()(x)
    expected = F.instance_norm(x, weight=layer.weight, bias=layer.bias, eps=1e-5)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)
    # Running stats take one BatchNorm step per sample.
    running_mean, running_var = torch.zeros(4), torch.ones(4)
    for sample in x:
        running_mean = 0.9 * running_mean + 0.1 * sample.mean((1, 2, 3))
        running_var = 0.9 * running_var + 0.1 * sample.var((1, 2, 3), unbiased=True)
    torch.testing.assert_close(layer.running_mean, running_mean, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(layer.running_var, running_var, atol=ATOL, rtol=ATOL)
    assert int(layer.num_batches_tracked) == 3


def test_ghost_batch_with_uneven_chunks() -> None:
    layer = GhostBatchNorm(4, virtual_batch=2)
    x = volume(n=3)
    out = layer.train()(x)
    torch.testing.assert_close(out[:2], F.batch_norm(x[:2], None, None, training=True), atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(out[2:], F.batch_norm(x[2:], None, None, training=True), atol=ATOL, rtol=ATOL)


def test_weight_standardized_filters_have_zero_mean_unit_variance() -> None:
    conv = make_norm_spec("ws_group").conv(8, 16)
    weight = conv.standardized_weight()
    flat = weight.flatten(1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(16), atol=1e-6, rtol=0)
    torch.testing.assert_close(flat.var(1, unbiased=False), torch.ones(16), atol=1e-4, rtol=0)
    x = torch.randn(1, 8, 4, 4, 4)
    torch.testing.assert_close(conv(x), F.conv3d(x, weight, None, padding=1), atol=ATOL, rtol=ATOL)
    # Scale invariance: multiplying the raw weight does not change the output.
    with torch.no_grad():
        conv.weight.mul_(7.0)
    torch.testing.assert_close(conv.standardized_weight(), weight, atol=1e-5, rtol=1e-5)
    assert standardize_filters(torch.ones(2, 3, 1, 1, 1)).abs().max() == 0  # constant filter: no 0/0


def test_weightnorm_conv_weight_is_g_v_over_norm_v() -> None:
    conv = make_norm_spec("weightnorm").conv(4, 6)
    g = conv.parametrizations.weight.original0
    v = conv.parametrizations.weight.original1
    with torch.no_grad():
        g.copy_(torch.rand_like(g) + 0.5)
    norm_v = v.flatten(1).norm(dim=1).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(conv.weight, g * v / norm_v, atol=1e-6, rtol=1e-6)
    assert conv.bias is not None
    assert isinstance(make_norm_spec("weightnorm").norm(6), nn.Identity)


def test_frn_matches_its_formula() -> None:
    layer = FilterResponseNorm(4, eps=1e-6)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        layer.bias.copy_(torch.tensor([0.0, 0.3, -0.2, 0.1]))
        layer.tau.copy_(torch.tensor([-0.5, 0.0, 0.2, -3.0]))
    x = volume()
    nu2 = x.pow(2).mean((2, 3, 4), keepdim=True)
    y = layer.weight.view(1, -1, 1, 1, 1) * x / torch.sqrt(nu2 + 1e-6) + layer.bias.view(1, -1, 1, 1, 1)
    expected = torch.max(y, layer.tau.view(1, -1, 1, 1, 1))
    torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=ATOL)
    # Per sample: the other samples of the batch do not matter.
    torch.testing.assert_close(layer(x[:1]), expected[:1], atol=ATOL, rtol=ATOL)


def test_frn_learnable_eps_gets_a_gradient() -> None:
    layer = FilterResponseNorm(4, learnable_eps=True)
    layer(volume()).sum().backward()
    assert layer.eps_learned is not None and layer.eps_learned.grad is not None


def test_single_process_syncbatch_is_batchnorm_and_says_so_once(monkeypatch, caplog) -> None:
    from norm_experiments.norms import PortableSyncBatchNorm, sync

    monkeypatch.setattr(sync, "_single_process_logged", False)
    with caplog.at_level("INFO", logger=sync.__name__):
        assert_same_as_batchnorm(PortableSyncBatchNorm(4), [volume(n=2, seed=s) for s in range(3)])
    assert [r.getMessage() for r in caplog.records if "syncbatch" in r.getMessage()] == [
        "syncbatch: no process group with more than one rank; behaving exactly as BatchNorm"
    ]
