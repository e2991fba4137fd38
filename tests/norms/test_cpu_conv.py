"""The depth-split conv, the oneDNN-tensor conv and the direct oneDNN conv (norms/cpu_conv.py) compute
F.conv3d: outputs and input/weight/bias gradients match for every conv layer shape of the default and the
quick-sweep U-Net, at batch 1 and 2, in both memory formats; they are taken only for one float32 sample on a
CPU; every conv the U-Net builds carries the trainer.cpu_conv setting."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from norm_experiments.models.unet import UNet3D
from norm_experiments.norms import CpuConv3d, make_norm_spec, set_cpu_conv
from norm_experiments.norms.cpu_conv import (
    MIN_UNFOLDED,
    MIN_UNFOLDED_ONEDNN,
    ONEDNN_MIN_CHANNELS,
    can_direct,
    can_split,
    can_use_onednn,
    conv3d,
    conv_path,
    direct_conv3d,
    onednn_conv3d,
    output_size,
    use_split,
)
from norm_experiments.run_names import run_identity
from tests.helpers import built_run, compose_config

CL = torch.channels_last_3d
# (depth, patch): configs/model/unet.yaml with the default 32^3 patch; configs/experiment/norm_sweep_quick.yaml
MODELS = {"default": (3, 32), "quick sweep": (2, 16)}


def layer_shapes(depth: int, patch: int) -> list[tuple[tuple[int, ...], tuple[int, ...], int, int]]:
    """(input shape at batch 1, weight shape, stride, padding) of every distinct Conv3d of the U-Net."""
    model = UNet3D(make_norm_spec("batch"), 1, 3, depth=depth, base_channels=8)
    shapes: dict[tuple, None] = {}

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        shapes.setdefault(
            (tuple(args[0].shape), tuple(module.weight.shape), module.stride[0], module.padding[0]), None
        )

    for module in model.modules():
        if isinstance(module, nn.Conv3d):
            module.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.zeros(1, 1, patch, patch, patch))
    return list(shapes)


def case_id(case: tuple) -> str:
    (_, c_in, *size), (c_out, *_), stride, _ = case
    return f"{c_in}to{c_out}-{size[0]}cubed-s{stride}"


CASES = [(name, case) for name, (depth, patch) in MODELS.items() for case in layer_shapes(depth, patch)]


def grads(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], grad_out: torch.Tensor) -> tuple:
    return torch.autograd.grad(out, inputs, grad_out)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize(("model", "case"), CASES, ids=[f"{m}-{case_id(c)}" for m, c in CASES])
def test_outputs_and_gradients_match_conv3d(model: str, case: tuple, batch: int, memory_format) -> None:
    input_shape, weight_shape, stride, padding = case
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *input_shape[1:]), generator=gen).contiguous(memory_format=memory_format)
    weight = torch.randn(weight_shape, generator=gen) * (2.0 / math.prod(weight_shape[1:])) ** 0.5
    bias = torch.randn(weight_shape[0], generator=gen)
    x, weight, bias = (t.requires_grad_() for t in (x, weight, bias))
    expected = F.conv3d(x, weight, bias, stride, padding)
    grad_out = torch.randn(expected.shape, generator=gen)
    expected_grads = grads(expected, (x, weight, bias), grad_out)
    for mode in ("auto", "split"):  # split: the split wherever the shape allows, auto: where measured faster
        out = conv3d(x, weight, bias, stride, padding, mode=mode)
        assert out.shape == expected.shape
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
        for got, want, name in zip(
            grads(out, (x, weight, bias), grad_out), expected_grads, "xwb", strict=True
        ):
            # weight/bias gradients sum over up to 32^3 voxels: compare relative to their size
            scale = want.abs().max().item()
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale, msg=f"{mode}: grad of {name}")
        if conv_path(mode, x, weight, tuple(expected.shape[2:])) != "torch" and input_shape[1] > 1:
            # the split and the oneDNN tensor hand back the input's memory format (one channel: both at once)
            assert out.is_contiguous(memory_format=memory_format)


def assert_matches_conv3d(
    conv, x: torch.Tensor, weight: torch.Tensor, bias, stride: int, padding: int, grad_layout: bool = True
) -> None:
    """`conv(x, weight, bias)` against F.conv3d: the output, every gradient that is asked for (relative to its
    size: weight and bias gradients sum over every voxel), dense gradients; the output, and with `grad_layout`
    the input's gradient, in the input's memory format."""
    expected = F.conv3d(x, weight, bias, stride, padding)
    out = conv(x, weight, bias)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    inputs = tuple(t for t in (x, weight, bias) if t is not None and t.requires_grad)
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(9))
    got_grads = grads(out, inputs, grad_out)
    for got, want in zip(got_grads, grads(expected, inputs, grad_out), strict=True):
        assert got.shape == want.shape and got.layout == torch.strided
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    if x.requires_grad and x.shape[1] > 1:  # one channel: both memory formats at once
        memory_format = CL if x.is_contiguous(memory_format=CL) else torch.contiguous_format
        assert out.is_contiguous(memory_format=memory_format)
        assert not grad_layout or got_grads[0].is_contiguous(memory_format=memory_format)


def route_conv(route: str, stride: int, padding: int):
    """onednn_conv3d or direct_conv3d as conv(x, weight, bias)."""
    triple = (stride,) * 3, (padding,) * 3
    if route == "onednn":
        return lambda x, w, b: onednn_conv3d(x, w, b, *triple, (1, 1, 1), 1)
    return lambda x, w, b: direct_conv3d(x, w, b, *triple)


@pytest.mark.parametrize("route", ["onednn", "direct"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize(("model", "case"), CASES, ids=[f"{m}-{case_id(c)}" for m, c in CASES])
def test_each_route_matches_conv3d(model: str, case: tuple, memory_format, route: str) -> None:
    """onednn_conv3d and direct_conv3d on every layer shape, also those auto does not send them (the oneDNN
    tensor: stride 2, 4^3, 1x1x1, 8 channels; the direct conv: 16 channels and more, 1x1x1)."""
    input_shape, weight_shape, stride, padding = case
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(input_shape, generator=gen).contiguous(memory_format=memory_format)
    weight = torch.randn(weight_shape, generator=gen) * (2.0 / math.prod(weight_shape[1:])) ** 0.5
    bias = torch.randn(weight_shape[0], generator=gen)
    x, weight, bias = (t.requires_grad_() for t in (x, weight, bias))
    # The oneDNN tensor's input gradient comes back contiguous (the backward of to_mkldnn); the direct conv's
    # keeps the input's layout.
    conv = route_conv(route, stride, padding)
    assert_matches_conv3d(conv, x, weight, bias, stride, padding, grad_layout=route == "direct")


@pytest.mark.parametrize(
    ("shape", "stride", "with_bias", "input_grad"),
    [
        (
            (1, 4, 9, 10, 11),
            2,
            True,
            True,
        ),  # odd sizes, stride 2: the transposed conv needs an output padding
        ((1, 4, 7, 6, 5), 2, False, True),
        ((1, 3, 6, 7, 8), 1, True, False),  # no input gradient (the image into the first layer)
        ((1, 1, 8, 8, 8), 1, False, True),  # one channel
    ],
)
def test_direct_conv_on_uneven_shapes(shape: tuple, stride: int, with_bias: bool, input_grad: bool) -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=gen).requires_grad_(input_grad)
    weight = (torch.randn(5, shape[1], 3, 3, 3, generator=gen) * 0.2).requires_grad_()
    bias = torch.randn(5, generator=gen).requires_grad_() if with_bias else None
    conv = lambda x, w, b: direct_conv3d(x, w, b, (stride,) * 3, (1, 1, 1))  # noqa: E731
    assert_matches_conv3d(conv, x, weight, bias, stride, 1)


def test_direct_conv_without_grad() -> None:
    """Evaluation (no_grad) runs the forward op alone and keeps no graph."""
    gen = torch.Generator().manual_seed(5)
    x, weight = (
        torch.randn(1, 8, 8, 8, 8, generator=gen),
        torch.randn(8, 8, 3, 3, 3, generator=gen, requires_grad=True),
    )
    with torch.no_grad():
        out = direct_conv3d(x, weight, None, (1, 1, 1), (1, 1, 1))
    assert out.grad_fn is None
    torch.testing.assert_close(out, F.conv3d(x, weight, None, 1, 1), rtol=1e-4, atol=1e-4)


def test_direct_conv_only_where_its_backward_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backward is written for ungrouped, undilated convs with padding below the kernel size, in oneDNN."""
    x, weight = torch.zeros(1, 8, 16, 16, 16), torch.zeros(8, 8, 3, 3, 3)
    ones = (1, 1, 1)
    assert can_direct(x, weight, ones, ones, 1)
    assert not can_direct(x, torch.zeros(8, 4, 3, 3, 3), ones, ones, 2)  # groups
    assert not can_direct(x, weight, (2, 2, 2), (2, 2, 2), 1)  # dilation
    assert not can_direct(x, weight, (3, 1, 1), ones, 1)  # padding of the kernel's size
    assert not can_direct(torch.zeros(2, 8, 16, 16, 16), weight, ones, ones, 1)  # a batch
    assert conv_path("auto", x, weight, (16, 16, 16), ones, (2, 2, 2), 1) == "split"  # dilated: the split
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert not can_direct(x, weight, ones, ones, 1)


def test_onednn_tensor_without_grad_and_with_groups() -> None:
    """Evaluation (no_grad) and grouped convs go through the same oneDNN tensor path."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 32, 8, 8, 8, generator=gen)
    weight = torch.randn(32, 16, 3, 3, 3, generator=gen) * 0.1
    with torch.no_grad():
        out = onednn_conv3d(x, weight, None, (1, 1, 1), (1, 1, 1), (1, 1, 1), 2)
    torch.testing.assert_close(out, F.conv3d(x, weight, None, 1, 1, 1, 2), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("model", "direct", "onednn"), [("default", 3, 7), ("quick sweep", 3, 3)])
def test_auto_takes_the_path_measured_faster(model: str, direct: int, onednn: int) -> None:
    """The rule the layer tables of scripts/benchmark.py (section e) measured, for 3x3x3 convs of one sample
    where C_in * 27 * output voxels >= 4096 * 27 (slow_conv3d below): direct_conv3d for layers with 2-15 input
    or output channels, a oneDNN tensor where both have 16 or more and for the one-channel image into the first
    layer; the 1x1x1 head keeps PyTorch's path. The split is no layer's fastest any more."""
    taken = []
    for input_shape, weight_shape, stride, padding in layer_shapes(*MODELS[model]):
        x, weight = torch.zeros(input_shape), torch.zeros(weight_shape)
        out_size = output_size(x, weight, (stride,) * 3, (padding,) * 3, (1, 1, 1))
        taken.append(conv_path("auto", x, weight, out_size, (padding,) * 3))
        unfolded = math.prod(weight_shape[1:]) * math.prod(out_size)
        if weight_shape[2] == 1 or unfolded < MIN_UNFOLDED_ONEDNN:
            want = "torch"
        elif input_shape[1] > 1 and min(weight_shape[:2]) < ONEDNN_MIN_CHANNELS:
            want = "direct"
        else:
            want = "onednn"
        assert taken[-1] == want
        assert not use_split("auto", x, weight, out_size)
        assert conv_path("auto", torch.zeros((2, *input_shape[1:])), weight, out_size) == "torch"  # batch 2
        assert conv_path("torch", x, weight, out_size) == "torch"
        assert conv_path("split", x, weight, out_size) == (
            "split" if can_split(x, weight, out_size[0]) else "torch"
        )
    assert taken.count("direct") == direct and taken.count("onednn") == onednn
    assert MIN_UNFOLDED > MIN_UNFOLDED_ONEDNN  # the split's own threshold, for layers direct cannot take


def test_auto_keeps_pytorch_path_when_onednn_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    x, weight = torch.zeros(1, 16, 8, 8, 8), torch.zeros(16, 16, 3, 3, 3)
    assert conv_path("auto", x, weight, (8, 8, 8)) == "onednn"
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert not can_use_onednn(x, weight)
    assert conv_path("auto", x, weight, (8, 8, 8)) == "torch"


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.zeros(1, 8, 16, 16, 16, dtype=torch.float64),
        lambda: torch.zeros(1, 8, 16, 16, 16, dtype=torch.bfloat16),
        lambda: torch.zeros(1, 8, 16, 16, 16, device="meta"),  # stands in for a CUDA tensor: not on the CPU
        lambda: torch.zeros(1, 8, 15, 16, 16),  # odd output depth: cannot halve
    ],
    ids=["float64", "bfloat16", "not-cpu", "odd-depth"],
)
def test_split_is_off_for_anything_but_float32_on_a_cpu(make) -> None:
    x = make()
    weight = torch.zeros(8, 8, 3, 3, 3, dtype=x.dtype, device=x.device)
    out_size = output_size(x, weight, (1, 1, 1), (1, 1, 1), (1, 1, 1))
    assert not can_split(x, weight, out_size[0])
    assert not use_split("split", x, weight, out_size)
    if x.shape[2] % 2 == 0:  # odd depth: one float32 CPU sample, which the oneDNN tensor takes
        assert not can_use_onednn(x, weight)
        wide = torch.zeros(8, 16, 3, 3, 3, dtype=x.dtype, device=x.device)
        assert conv_path("auto", torch.zeros_like(x).repeat(1, 2, 1, 1, 1), wide, out_size) == "torch"


def test_split_is_off_under_cpu_autocast() -> None:
    x, weight = torch.zeros(1, 8, 16, 16, 16), torch.zeros(8, 8, 3, 3, 3)
    assert can_split(x, weight, 16) and can_use_onednn(x, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not can_split(x, weight, 16)
        assert not can_use_onednn(x, weight)


@pytest.mark.cuda
def test_split_is_off_on_cuda() -> None:
    conv = CpuConv3d(8, 8, 3, padding=1).cuda()
    set_cpu_conv(conv, "split")
    x = torch.randn(1, 8, 16, 16, 16, device="cuda")
    assert not can_split(x, conv.weight, 16)
    torch.testing.assert_close(conv(x), F.conv3d(x, conv.weight, conv.bias, 1, 1))


@pytest.mark.parametrize("norm", ["ws_group", "weightnorm", "batch"])
def test_norm_convs_take_the_split_with_the_same_gradients(norm: str) -> None:
    """ws_group's standardized weight and weightnorm's parametrized weight go through the split as well."""
    torch.manual_seed(0)
    conv = make_norm_spec(norm).conv(8, 16)
    assert isinstance(conv, CpuConv3d)
    x = torch.randn(1, 8, 16, 16, 16)
    results = {}
    for mode in ("torch", "auto"):
        set_cpu_conv(conv, mode)
        conv.zero_grad()
        out = conv(x)
        out.square().mean().backward()
        results[mode] = (out.detach(), {n: p.grad.clone() for n, p in conv.named_parameters()})
    (out_torch, grads_torch), (out_auto, grads_auto) = results["torch"], results["auto"]
    # float rounding relative to each tensor's size (standardized weights give outputs of ~10)
    torch.testing.assert_close(out_auto, out_torch, rtol=1e-4, atol=1e-6 * out_torch.abs().max().item())
    assert grads_torch.keys() == grads_auto.keys() and len(grads_torch) >= 1
    for name, grad in grads_torch.items():
        atol = 1e-5 * grad.abs().max().item()  # sums over 16^3 voxels, through the weight transforms
        torch.testing.assert_close(grads_auto[name], grad, rtol=1e-4, atol=atol, msg=name)


def test_set_cpu_conv_reaches_every_conv_of_the_unet() -> None:
    for norm in ("batch", "ws_group", "weightnorm"):
        model = UNet3D(make_norm_spec(norm), 1, 3, depth=2)
        convs = [m for m in model.modules() if isinstance(m, nn.Conv3d)]
        assert all(isinstance(m, CpuConv3d) for m in convs)  # the head too
        assert (
            set_cpu_conv(model, "torch") == len(convs) == 2 * (3 + 2) + 1
        )  # DoubleConvs of 3 encoder, 2 decoder levels; head
        assert {m.cpu_conv for m in convs} == {"torch"}
    with pytest.raises(ValueError, match="cpu_conv"):
        set_cpu_conv(model, "fast")


def test_the_run_applies_trainer_cpu_conv(tmp_path: Path) -> None:
    run = built_run(tmp_path, ["experiment=smoke", "data.batch_size=1", "trainer.cpu_conv=torch"])
    assert {m.cpu_conv for m in run.b.model.modules() if isinstance(m, CpuConv3d)} == {"torch"}
    images, labels = run.b.sampler.batch(0)
    assert torch.isfinite(run.train_step(images, labels))


def test_cpu_conv_is_execution_only() -> None:
    """Float rounding only: a run may resume with another setting (as with trainer.num_threads)."""
    base = compose_config(["experiment=smoke"])
    assert run_identity(base) == run_identity(compose_config(["experiment=smoke", "trainer.cpu_conv=torch"]))


def test_compiled_training_at_batch_1_runs_and_matches_eager(tmp_path: Path) -> None:
    """trainer.compile=true at batch 1 on a CPU: dynamo cannot trace the routes (a oneDNN tensor, the raw
    mkldnn_convolution op), so each runs eagerly behind a graph break; this crashed before (fake-tensor
    strides, then inductor's dynamic-shape lowering). Compiling changes float rounding only."""
    losses = {}
    for compile_ in ("false", "true"):
        overrides = ["experiment=smoke", "data.batch_size=1", f"trainer.compile={compile_}"]
        run = built_run(tmp_path / compile_, overrides)
        images, labels = run.b.sampler.batch(0)
        losses[compile_] = [float(run.train_step(images, labels)) for _ in range(2)]
    assert losses["true"] == pytest.approx(losses["false"], abs=1e-5)
    # A compile per layer shape (the routes break the graph between layers): nnU-Net's network at 32^3 hit
    # dynamo's default limit of 8 and fell back to eager with warnings.
    assert torch._dynamo.config.recompile_limit >= 64
    assert losses["false"][1] != losses["false"][0]  # the first step changed the weights


def test_training_does_not_load_dynamo_unless_it_compiles() -> None:
    """torch.compiler.disable loads torch._dynamo (seconds at every start); the routes take it only while
    compiling. It was applied at import, so every command paid for it."""
    code = (
        "import sys, norm_experiments.training.build, norm_experiments.training.loop\n"
        "print('torch._dynamo' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr[-2000:]
