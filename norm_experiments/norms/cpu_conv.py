"""Fast CPU conv3d for one sample: split the volume in two along depth and convolve the halves as a batch.

At batch size 1, PyTorch runs a float32 CPU conv3d on ``aten::slow_conv3d`` (vol2col + GEMM) instead of
oneDNN: ATen's backend choice (``use_mkldnn`` in aten/src/ATen/native/Convolution.cpp) wants ``N > 1`` or
``N*C*D*H > 20480`` for kernels of 3x3x3 and smaller, and at N = 1 no layer of the default or the
quick-sweep U-Net passes (the largest has C*D*H = 16*32*32 = 16384). There is
no supported switch that forces oneDNN: a channels_last_3d input still takes ``slow_conv3d``, and calling
the oneDNN op directly (``torch.ops.aten.mkldnn_convolution``) speeds up only the forward, because its
backward goes through ``convolution_backward``, which makes the same choice.

The depth split hands ATen a batch of two without changing what is computed: the output's depth rows are
cut into two halves, each half reads its own slab of the zero-padded input (neighbouring slabs share the
kernel's halo rows), both slabs go through one ``F.conv3d`` as a batch of 2 (oneDNN, forward and
backward), and the halves are joined again. No output row is computed twice; autograd differentiates the
pad/slice/cat, so the gradients are those of the same convolution up to float rounding.

scripts/benchmark.py (section e) times every layer shape of the default and quick-sweep U-Nets each way;
docs/benchmarks.md ("Batch 1 on a CPU") has the tables the rule in `use_split` comes from. Which path a
call takes is a pure function of the setting, device, dtype and shapes, never of timing, so a resumed run
takes the same path as the uninterrupted one at every layer. ConvTranspose3d stays on PyTorch's path:
at batch 1 its ``slow_conv_transpose3d`` was as fast per sample as oneDNN at batch 2.

A second way past ``slow_conv3d`` (added 2026-12-07): ``use_mkldnn`` sends any input that is a oneDNN
(mkldnn) tensor to oneDNN, at N = 1 too, forward and backward. ``onednn_conv3d`` converts the sample with
``Tensor.to_mkldnn()``, convolves it whole and converts the result back with ``to_dense()``; autograd
differentiates both conversions (each is a copy), so again the gradients are those of the same convolution up
to float rounding. Measured per layer at batch 1 (docs/benchmarks.md, section e), it beat the split on every
layer with 16 or more input channels (0.66-0.95x its time; stride-2 layers and 4^3 volumes included, where
the split lost to ``slow_conv3d``) and on the first layer (one input channel), and lost to it with 8
(1.2-1.4x: oneDNN's blocked layouts hold 16 channels); ``auto`` therefore takes it for those layers and
keeps the split for the others.

A third way (added 2026-12-07, after the second): ``direct_conv3d`` calls the oneDNN forward op
(``torch.ops.aten.mkldnn_convolution``, which takes a dense sample at N = 1 too) for the forward, and writes the
backward as two more forward convolutions, so no call reaches ``convolution_backward``'s backend choice:
- the input's gradient of a stride-1 conv is the conv of the output's gradient with the weight flipped in
  every spatial axis and its two channel axes swapped, padded by k - 1 - p (strided convs: the transposed
  conv, PyTorch's own path);
- the weight's gradient is the conv of the input, its channels taken as a batch of one-channel volumes, with
  the output's gradient, its channels taken as the filters (dilated by the stride), cropped to the kernel:
  grad_w[o, i, a] = sum over x of grad_out[o, x] * input_padded[i, stride * x + a].
These are the gradients of the same convolution, up to float rounding. It needs no depth halo and no layout
conversion, which made it faster than both other routes on the 8-channel layers and on 16->8 at 32^3, as fast
as the oneDNN tensor on 16->8 at 16^3, and slower than the oneDNN tensor where both channel counts are 16 or
more (docs/benchmarks.md, section e); ``auto`` takes it for layers with fewer than 16 of either.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# trainer.cpu_conv values: auto = direct_conv3d, a oneDNN tensor or the split where scripts/benchmark.py measured
# it faster; split = the split wherever the shape allows it; torch = always PyTorch's own choice.
CPU_CONV_MODES = ("auto", "split", "torch")

# auto splits a layer where slow_conv3d's unfolded input is large. slow_conv3d copies the input into a
# (C_in * k^3) x (output voxels) matrix (vol2col) and multiplies it with the weights; from 8192 * 27 elements
# (0.84 MiB) up the split was 1.08-12x faster, at 4096 * 27 and below 0.47-0.95x (per-layer tables of
# scripts/benchmark.py section e, both U-Nets; docs/benchmarks.md "Batch 1 on a CPU"). 1x1x1 convs unfold
# nothing, and the split made the 1x1x1 head 3x slower: auto leaves them alone.
MIN_UNFOLDED = 8192 * 27
# auto converts a layer with at least ONEDNN_MIN_CHANNELS input channels (per group), or with a one-channel
# input (the first layer), to a oneDNN tensor where the unfolded matrix has at least MIN_UNFOLDED_ONEDNN
# elements: 0.62-0.79x the time of the split or of slow_conv3d on such layers of both U-Nets, 0.65-0.87x on
# the 1->8 first layers; below that size (16->32 stride 2 into 4^3, 32->32 and 32->64 into 4^3: 2048 * 27 and
# less) slow_conv3d was about as fast or faster (0.9-1.5x).
ONEDNN_MIN_CHANNELS = 16
MIN_UNFOLDED_ONEDNN = 4096 * 27
# Before both, auto takes direct_conv3d for a layer with fewer than ONEDNN_MIN_CHANNELS input or output channels
# (and more than one input channel) from the same size up: the 8-channel layers, the stride-2 layer from 8 to
# 16 channels and 16->8, where it beat or tied the split, the oneDNN tensor and slow_conv3d in the per-layer
# tables (docs/benchmarks.md, section e); where both have 16 or more the oneDNN tensor stayed faster.


def _triple(value: int | tuple[int, ...]) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    return tuple(value)  # type: ignore[return-value]


def output_size(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
) -> tuple[int, int, int]:
    """(D_out, H_out, W_out) of the conv's result."""
    return tuple(  # type: ignore[return-value]
        (x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
        for i in range(3)
    )


def one_cpu_sample(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """One float32 sample on a CPU (not under CPU autocast): where PyTorch takes ``slow_conv3d``."""
    return (
        x.dim() == 5
        and x.shape[0] == 1
        and x.device.type == "cpu"
        and x.layout == torch.strided
        and weight.layout == torch.strided
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
    )


def can_split(x: torch.Tensor, weight: torch.Tensor, out_depth: int) -> bool:
    """The split applies: one float32 sample on a CPU (not under CPU autocast), and an output depth that
    halves evenly. Everything else (CUDA, bf16, batches) keeps PyTorch's own path."""
    return one_cpu_sample(x, weight) and out_depth >= 2 and out_depth % 2 == 0


def can_use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """onednn_conv3d applies: one float32 CPU sample, and PyTorch has oneDNN (built in and not turned off)."""
    return (
        one_cpu_sample(x, weight) and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    )


def can_direct(
    x: torch.Tensor,
    weight: torch.Tensor,
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
) -> bool:
    """direct_conv3d applies: one float32 CPU sample with oneDNN available, an ungrouped, undilated conv
    whose padding is at most k - 1 in every axis (the input gradient's padding, k - 1 - p, is not negative)."""
    return (
        groups == 1
        and tuple(dilation) == (1, 1, 1)
        and all(0 <= padding[i] < weight.shape[2 + i] for i in range(3))
        and can_use_onednn(x, weight)
    )


def conv_path(
    mode: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    out_size: tuple[int, int, int],
    padding: tuple[int, ...] = (1, 1, 1),
    dilation: tuple[int, ...] = (1, 1, 1),
    groups: int = 1,
) -> str:
    """Which way `mode` (a CPU_CONV_MODES value) sends this call: "split" (depth_split_conv3d), "onednn"
    (onednn_conv3d), "direct" (direct_conv3d) or "torch" (F.conv3d). A pure function of the mode, device,
    dtype and shapes."""
    if mode == "torch":
        return "torch"
    if mode == "split":
        return "split" if can_split(x, weight, out_size[0]) else "torch"
    if weight.shape[2] == 1 or not one_cpu_sample(x, weight):
        return "torch"
    unfolded = math.prod(weight.shape[1:]) * math.prod(out_size)  # C_in/groups * k^3 rows x output voxels
    few_channels = min(weight.shape[0], weight.shape[1]) < ONEDNN_MIN_CHANNELS
    if x.shape[1] > 1 and few_channels and unfolded >= MIN_UNFOLDED_ONEDNN:
        if can_direct(x, weight, padding, dilation, groups):
            return "direct"
    if weight.shape[1] >= ONEDNN_MIN_CHANNELS or x.shape[1] == 1:  # 1: the image, into the first layer
        if unfolded >= MIN_UNFOLDED_ONEDNN and can_use_onednn(x, weight):
            return "onednn"
        return "torch"
    return "split" if unfolded >= MIN_UNFOLDED and can_split(x, weight, out_size[0]) else "torch"


def use_split(mode: str, x: torch.Tensor, weight: torch.Tensor, out_size: tuple[int, int, int]) -> bool:
    """Whether `mode` (a CPU_CONV_MODES value) sends this call through the depth split."""
    return conv_path(mode, x, weight, out_size) == "split"


def onednn_conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
) -> torch.Tensor:
    """F.conv3d of a (1, C, D, H, W) input in oneDNN, forward and backward, through a oneDNN tensor (see the
    module doc); the result comes back in the input's memory format."""
    out = F.conv3d(x.to_mkldnn(), weight, bias, stride, padding, dilation, groups).to_dense()
    return out.contiguous(memory_format=_memory_format(x))


class _DirectConv3d(torch.autograd.Function):
    """F.conv3d of one dense sample: forward and backward as oneDNN forward convolutions (module doc)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):  # noqa: ANN001, ANN205 (autograd's signature)
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        return _onednn_forward(x, weight, bias, padding, stride)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x, weight = ctx.saved_tensors
        grad = grad.contiguous(memory_format=_memory_format(x))  # an expanded or odd-strided gradient
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_x = _input_grad(grad, x, weight, ctx.stride, ctx.padding) if need_x else None
        grad_weight = _weight_grad(grad, x, weight, ctx.stride, ctx.padding) if need_weight else None
        grad_bias = grad.sum((0, 2, 3, 4)) if need_bias and ctx.has_bias else None
        return grad_x, grad_weight, grad_bias, None, None


def _onednn_forward(x, weight, bias, padding, stride, dilation=(1, 1, 1)) -> torch.Tensor:  # noqa: ANN001
    """oneDNN's forward convolution (ungrouped) of dense tensors, at any batch size."""
    return torch.ops.aten.mkldnn_convolution(x, weight, bias, padding, stride, dilation, 1)


def _input_grad(grad, x, weight, stride, padding) -> torch.Tensor:  # noqa: ANN001
    """The input's gradient: for stride 1 the conv of `grad` with the flipped weight, channel axes swapped;
    strided convs take the transposed conv, with the output padding that restores the input's size."""
    kernel = weight.shape[2:]
    if tuple(stride) == (1, 1, 1):
        flipped = weight.flip(2, 3, 4).transpose(0, 1).contiguous()
        return _onednn_forward(grad, flipped, None, tuple(k - 1 - p for k, p in zip(kernel, padding)), stride)
    extra = tuple(
        x.shape[2 + i] - ((grad.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + kernel[i]) for i in range(3)
    )
    return F.conv_transpose3d(grad, weight, None, stride, padding, extra).contiguous(
        memory_format=_memory_format(x)
    )


def _weight_grad(grad, x, weight, stride, padding) -> torch.Tensor:  # noqa: ANN001
    """The weight's gradient: the input's channels as a batch of one-channel volumes, convolved with the
    gradient's channels as filters dilated by the stride; rows past the kernel (input rows no output reads,
    where the stride does not divide evenly) are cropped."""
    by_channel = _onednn_forward(
        x.transpose(0, 1).contiguous(), grad.transpose(0, 1).contiguous(), None, padding, (1, 1, 1), stride
    )
    kernel = weight.shape[2:]
    return by_channel[:, :, : kernel[0], : kernel[1], : kernel[2]].transpose(0, 1).contiguous()


def direct_conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
) -> torch.Tensor:
    """F.conv3d (ungrouped, undilated) of a (1, C, D, H, W) input in oneDNN without a oneDNN tensor: the
    forward op and a backward written as forward convolutions (see the module doc)."""
    return _DirectConv3d.apply(x, weight, bias, tuple(stride), tuple(padding))


def depth_split_conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
) -> torch.Tensor:
    """F.conv3d of a (1, C, D, H, W) input computed as a batch of two depth slabs (see the module doc).

    The slabs are handed to oneDNN in channels_last_3d, its faster layout for these shapes at batch 2
    (measured per layer: docs/benchmarks.md); the result comes back in the input's memory format.
    """
    half = output_size(x, weight, stride, padding, dilation)[0] // 2
    span = dilation[0] * (weight.shape[2] - 1) + 1
    rows = (half - 1) * stride[0] + span  # padded input rows that one half of the output reads
    start = half * stride[0]  # first padded row of the second slab
    slabs = _slabs(x, rows, start, padding[0])
    out = F.conv3d(slabs, weight, bias, stride, (0, padding[1], padding[2]), dilation, groups)
    # (2, C, half, H', W') -> (1, C, 2 * half, H', W'): one copy, and a view in backward.
    joined = out.transpose(0, 1).reshape(1, out.shape[1], 2 * half, *out.shape[3:])
    return joined.contiguous(memory_format=_memory_format(x))


def _slabs(x: torch.Tensor, rows: int, start: int, pad: int) -> torch.Tensor:
    """The two depth slabs of the zero-padded input, (2, C, rows, H, W) in channels_last_3d, written into one
    buffer: one copy per slab (padding, stacking and the layout change in one step)."""
    depth = x.shape[2]
    shape = (2, x.shape[1], rows, *x.shape[3:])
    slabs = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d).zero_()
    for i, first in enumerate((-pad, start - pad)):  # first input row each slab reads (negative: padding)
        low, high = max(first, 0), min(first + rows, depth)
        slabs[i, :, low - first : high - first].copy_(x[0, :, low:high])
    return slabs


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """The input's memory format: channels_last_3d for channels_last strides (checked on the channel stride,
    which tells the two apart for one channel too), else contiguous."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last_3d) and x.stride(1) == 1
    return torch.channels_last_3d if channels_last else torch.contiguous_format


def conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
    mode: str = "auto",
) -> torch.Tensor:
    """F.conv3d (zero padding given as numbers), through the depth split, a oneDNN tensor or direct_conv3d
    where `mode` says so (conv_path)."""
    stride, padding, dilation = _triple(stride), _triple(padding), _triple(dilation)
    out_size = output_size(x, weight, stride, padding, dilation)
    path = conv_path(mode, x, weight, out_size, padding, dilation, groups)
    if path == "torch":
        return F.conv3d(x, weight, bias, stride, padding, dilation, groups)
    # Under trainer.compile the graph breaks here and the route runs eagerly: dynamo cannot trace a oneDNN tensor
    # or the raw mkldnn_convolution op (compiling them failed), and PyTorch's own path at batch 1 is
    # slow_conv3d. Wrapped only while compiling: torch.compiler.disable imports dynamo, slow for every start.
    route = torch.compiler.disable(_route) if torch.compiler.is_compiling() else _route
    return route(path, x, weight, bias, stride, padding, dilation, groups)


def _route(path, x, weight, bias, stride, padding, dilation, groups) -> torch.Tensor:  # noqa: ANN001
    """The conv through `path` (conv_path's answer other than "torch")."""
    if path == "direct":
        return direct_conv3d(x, weight, bias, stride, padding)
    if path == "onednn":
        return onednn_conv3d(x, weight, bias, stride, padding, dilation, groups)
    return depth_split_conv3d(x, weight, bias, stride, padding, dilation, groups)


class CpuConv3d(nn.Conv3d):
    """nn.Conv3d (same arguments, same state_dict) whose single-sample CPU calls may take the depth split.

    `cpu_conv` (a CPU_CONV_MODES value, default auto) is set per model by `set_cpu_conv`. Subclasses that
    transform the weight (WSConv3d) or parametrize it (weight_norm) go through `_conv_forward` too.
    """

    cpu_conv: str = "auto"

    def _conv_forward(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super()._conv_forward(input, weight, bias)  # padding nn.Conv3d does itself: its own path
        return conv3d(
            input, weight, bias, self.stride, self.padding, self.dilation, self.groups, self.cpu_conv
        )


def set_cpu_conv(model: nn.Module, mode: str) -> int:
    """Set trainer.cpu_conv on every CpuConv3d of `model`; returns how many convs it set."""
    if mode not in CPU_CONV_MODES:
        raise ValueError(f"cpu_conv must be one of {', '.join(CPU_CONV_MODES)}, got {mode!r}")
    convs = [m for m in model.modules() if isinstance(m, CpuConv3d)]
    for conv in convs:
        conv.cpu_conv = mode
    return len(convs)
