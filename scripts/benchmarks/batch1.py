"""e. Batch 1 on a CPU: forward + backward of every conv layer shape at batch 1, PyTorch's path against the
depth split, the oneDNN tensor and the direct oneDNN conv of norms/cpu_conv.py (trainer.cpu_conv), and
per-patch training throughput of every norm at batch 1 vs batch 2 with cpu_conv on and off (target: batch 1
>= 0.7x batch 2). Skipped on CUDA."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.common import (
    Context,
    Ratio,
    build_run,
    compose_cfg,
    describe_cfg,
    fmt,
    interval_verdict,
    median,
    paired_ratio,
    prepare,
    table,
    timed,
    timeit,
)
from norm_experiments.norms import cpu_conv
from norm_experiments.training.build import Built

BATCH1_TARGET = 0.7  # per-patch training throughput at batch 1 / at batch 2, CPU


def max_fixed_per_sample(target: float = BATCH1_TARGET) -> float:
    """The largest F / c (step_cost_split) at which batch 1 still reaches `target` times batch 2 per patch."""
    return (2 - 2 * target) / (2 * target - 1)


@dataclass(frozen=True)
class ConvLayer:
    """One conv of a U-Net as it runs at batch 1 (recorded by a forward hook)."""

    transposed: bool
    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    input_grad: bool  # False for the first layer: the image needs no gradient

    def describe(self) -> str:
        first, second = self.weight_shape[:2]  # Conv3d weights are (out, in, ...), transposed (in, out, ...)
        c_in, c_out = (first, second) if self.transposed else (second, first)
        size = "x".join(map(str, self.input_shape[2:]))
        kind = "ConvTranspose3d" if self.transposed else "Conv3d"
        return f"{kind} k{self.weight_shape[2]} s{self.stride[0]}, {c_in}->{c_out}, input {size}"

    def conv(self, weight: torch.Tensor, mode: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The layer's convolution: PyTorch's path (mode torch), norms/cpu_conv.py's (auto, split),
        cpu_conv.onednn_conv3d (mode onednn) or cpu_conv.direct_conv3d (mode direct)."""
        if self.transposed:
            return lambda x: torch.nn.functional.conv_transpose3d(x, weight, None, self.stride, self.padding)
        if mode == "direct":
            return lambda x: cpu_conv.direct_conv3d(x, weight, None, tuple(self.stride), tuple(self.padding))
        if mode == "onednn":
            stride, padding = tuple(self.stride), tuple(self.padding)
            return lambda x: cpu_conv.onednn_conv3d(x, weight, None, stride, padding, (1, 1, 1), 1)
        return lambda x: cpu_conv.conv3d(x, weight, None, self.stride, self.padding, mode=mode)


def conv_layers(run: Built) -> list[ConvLayer]:
    """Every distinct conv of the Run's model, in forward order, with its batch-1 input shape."""
    seen: dict[ConvLayer, None] = {}

    def hook(module, args, out) -> None:
        transposed = isinstance(module, torch.nn.ConvTranspose3d)
        x = args[0]
        shapes = (tuple(x.shape), tuple(module.weight.shape))
        layer = ConvLayer(transposed, *shapes, module.stride, module.padding, x.requires_grad)
        seen.setdefault(layer, None)

    convs = [m for m in run.model.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
    handles = [m.register_forward_hook(hook) for m in convs]
    run.model(torch.zeros(1, run.data.info.num_channels, *run.cfg.data.patch_size))  # as in training
    for handle in handles:
        handle.remove()
    return list(seen)


def aten_backend(layer: ConvLayer, x: torch.Tensor, weight: torch.Tensor) -> str:
    """The kernel ATen picks for this call (Slow3d = slow_conv3d, Mkldnn = oneDNN); forward and backward
    make the same choice. torch._C._select_conv_backend is private: reporting only."""
    try:
        backend = torch._C._select_conv_backend(
            x,
            weight,
            None,
            list(layer.stride),
            list(layer.padding),
            [1, 1, 1],
            layer.transposed,
            [0, 0, 0],
            1,
        )
    except (AttributeError, RuntimeError, TypeError):
        return "unknown"
    return str(backend).rsplit(".", 1)[-1]


def forward_backward(conv: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], None]:
    grad = torch.randn_like(conv(x).detach())
    return lambda: conv(x).backward(grad)


def layer_variants(layer: ConvLayer) -> tuple[dict[str, Callable[[], None]], str, str]:
    """Forward + backward of one layer each way, (PyTorch's backend at batch 1, what auto takes)."""
    x1 = torch.randn(layer.input_shape, requires_grad=layer.input_grad)
    x2 = torch.randn((2, *layer.input_shape[1:]), requires_grad=layer.input_grad)
    weight = (torch.randn(layer.weight_shape) * 0.1).requires_grad_()
    backend = aten_backend(layer, x1, weight)
    fns = {"torch": forward_backward(layer.conv(weight, "torch"), x1)}
    if layer.transposed:
        return {**fns, "batch 2": forward_backward(layer.conv(weight, "torch"), x2)}, backend, "torch"
    pad, stride = list(layer.padding), list(layer.stride)
    onednn = lambda x: torch.ops.aten.mkldnn_convolution(x, weight, None, pad, stride, [1, 1, 1], 1)  # noqa: E731
    fns["oneDNN op"] = forward_backward(onednn, x1)
    out_size = cpu_conv.output_size(x1, weight, layer.stride, layer.padding, (1, 1, 1))
    if cpu_conv.can_split(x1, weight, out_size[0]):
        fns["split"] = forward_backward(layer.conv(weight, "split"), x1)
    if cpu_conv.can_use_onednn(x1, weight):
        fns["onednn"] = forward_backward(layer.conv(weight, "onednn"), x1)
    if cpu_conv.can_direct(x1, weight, layer.padding, (1, 1, 1), 1):
        fns["direct"] = forward_backward(layer.conv(weight, "direct"), x1)
    fns["batch 2"] = forward_backward(layer.conv(weight, "torch"), x2)
    return fns, backend, cpu_conv.conv_path("auto", x1, weight, out_size, layer.padding)


def calls_per_block(fn: Callable[[], None], seconds: float) -> int:
    """How many calls make a timed block of about `seconds` (single layers take 0.1-300 ms)."""
    return max(1, min(200, round(seconds / max(timed(fn, lambda: None)[0], 1e-6))))


def layer_row(ctx: Context, layer: ConvLayer) -> tuple[list[object], dict[str, float]]:
    p = ctx.profile
    fns, backend, auto = layer_variants(layer)
    calls = calls_per_block(fns["torch"], 0.005 if p.name == "smoke" else 0.05)
    times = timeit(fns, p.warmup, calls, p.repeats, lambda: None)
    ms = {name: median(t) * 1e3 for name, t in times.items()}
    ms["batch 2"] /= 2  # per sample
    ms["auto"] = ms[auto]
    speedup, spread = {}, {}
    for path in ("split", "onednn", "direct"):
        speedup[path], spread[path] = "n/a", ""
        if path in times:
            paired = [a / b for a, b in zip(times["torch"], times[path], strict=True)]
            speedup[path] = paired_ratio(times["torch"], times[path]).text(2, "x")
            spread[path] = f" ({min(paired):.2f}-{max(paired):.2f})"
    row = [
        layer.describe(),
        backend,
        fmt(ms["torch"], 2),
        fmt(ms.get("oneDNN op", float("nan")), 2),
        fmt(ms.get("split", float("nan")), 2),
        speedup["split"] + spread["split"],
        fmt(ms.get("onednn", float("nan")), 2),
        speedup["onednn"] + spread["onednn"],
        fmt(ms.get("direct", float("nan")), 2),
        speedup["direct"] + spread["direct"],
        fmt(ms["batch 2"], 2),
        auto,
    ]
    return row, ms


def measure_layers(ctx: Context, model_overrides: tuple[str, ...]) -> str:
    run = build_run(ctx, ["norm=batch", *model_overrides])  # layer shapes do not depend on the norm
    setup = describe_cfg(run.cfg).split(", batch")[0]
    rows, total = [], {"torch": 0.0, "auto": 0.0, "batch 2": 0.0}
    for layer in conv_layers(run):
        ctx.log(f"batch 1: {layer.describe()}")
        row, ms = layer_row(ctx, layer)
        rows.append(row)
        for name in total:
            total[name] += ms[name]
    rows.append(
        [
            "every layer once (sum)",
            "",
            fmt(total["torch"], 2),
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            fmt(total["batch 2"], 2),
            "",
        ]
    )
    head = [
        "layer (batch 1)",
        "ATen backend",
        "PyTorch ms",
        "oneDNN op ms",
        "depth split ms",
        "split speed-up [95 % interval] (per-pair min-max)",
        "oneDNN tensor ms",
        "oneDNN tensor speed-up [95 % interval] (per-pair min-max)",
        "direct ms",
        "direct speed-up [95 % interval] (per-pair min-max)",
        "batch 2, ms per sample",
        "auto takes",
    ]
    return "\n".join(
        [
            f"### Conv layers at batch 1: {setup}",
            "",
            f"Forward + backward of one call (weight grads, and input grads but for the first layer), "
            "median block; oneDNN tensor: cpu_conv.onednn_conv3d (to_mkldnn, conv, to_dense); direct: "
            "cpu_conv.direct_conv3d (oneDNN's forward op, the backward as two forward convs); speed-ups "
            "over PyTorch's path: geometric mean of the per-round ratios. With auto the layers "
            f"take {fmt(total['auto'], 1)} ms in all, against {fmt(total['torch'], 1)} ms on PyTorch's "
            f"path ({total['torch'] / total['auto']:.2f}x) and {fmt(total['batch 2'], 1)} ms per sample "
            "at batch 2.",
            "",
            table(head, rows),
        ]
    )


BATCH1_VARIANTS = (  # (name, batch size, overrides): blocks of all four alternate
    ("b1 torch", 1, ("trainer.cpu_conv=torch",)),
    ("b1 auto", 1, ("trainer.cpu_conv=auto",)),
    ("b1 auto cl", 1, ("trainer.cpu_conv=auto", "trainer.channels_last=true")),
    ("b2", 2, ()),
)


def batch1_norm_row(ctx: Context, norm: str, model_overrides: tuple[str, ...]) -> tuple[list[object], Ratio]:
    p = ctx.profile
    ctx.log(f"batch 1: norm={norm} {' '.join(model_overrides)}")
    preps, patches = {}, {}
    for name, bs, overrides in BATCH1_VARIANTS:
        prep = prepare(ctx, [f"norm={norm}", f"data.batch_size={bs}", *model_overrides, *overrides])
        preps[name], patches[name] = prep, prep.run.plan.effective_batch
    times = timeit({n: prep.step() for n, prep in preps.items()}, p.warmup, p.steps, p.repeats, lambda: None)
    per_patch = {n: [t / patches[n] for t in ts] for n, ts in times.items()}
    ms = {n: median(ts) * 1e3 for n, ts in per_patch.items()}
    paired = [b2 / b1 for b1, b2 in zip(per_patch["b1 auto"], per_patch["b2"], strict=True)]
    ratio = paired_ratio(per_patch["b2"], per_patch["b1 auto"])
    fixed, per_sample = step_cost_split(times["b1 auto"], times["b2"])
    interval = "(1 round)" if ratio.rounds < 2 else f"[{ratio.low:.2f}, {ratio.high:.2f}]"
    row = [
        norm,
        fmt(ms["b1 torch"]),
        fmt(ms["b1 auto"]),
        fmt(ms["b1 auto cl"]),
        fmt(ms["b2"]),
        f"{ms['b2'] / ms['b1 torch']:.2f}",
        f"**{ratio.value:.2f}** {interval} (pairs {min(paired):.2f}-{max(paired):.2f})",
        interval_verdict(ratio, BATCH1_TARGET, at_most=False),
        f"{fixed * 1e3:.1f} / {per_sample * 1e3:.1f} ({fixed / per_sample:.2f})",
        f"{ms['b1 auto'] / ms['b1 auto cl']:.2f}x",
    ]
    return row, ratio


def step_cost_split(step_b1: list[float], step_b2: list[float]) -> tuple[float, float]:
    """A step's time as F + n * c (n samples): F, what a step pays once whatever its batch (each call's fixed
    cost, Python, the optimizer), is 2 t1 - t2; c, the cost of one more sample, is t2 - t1 (medians over the
    rounds of the per-round values). Batch 1 reaches r times batch 2's throughput per patch where
    (F + 2c) / (2F + 2c) >= r, i.e. F <= c (2 - 2r) / (2r - 1): for r = 0.7, F <= 1.5 c."""
    fixed = median([2 * t1 - t2 for t1, t2 in zip(step_b1, step_b2, strict=True)])
    return fixed, median([t2 - t1 for t1, t2 in zip(step_b1, step_b2, strict=True)])


def measure_batch1_norms(ctx: Context, model_overrides: tuple[str, ...]) -> str:
    rows, ratios = [], {}
    for norm in ctx.profile.batch1_norms:
        row, ratios[norm] = batch1_norm_row(ctx, norm, model_overrides)
        rows.append(row)
    cfg = compose_cfg(ctx, list(model_overrides))
    setup = describe_cfg(cfg).split(", batch")[0]
    worst = min(ratios, key=lambda norm: ratios[norm].value)
    ratio = ratios[worst]
    interval = "" if ratio.rounds < 2 else f" [{ratio.low:.2f}, {ratio.high:.2f}]"
    ctx.summary.append(  # the worst norm's own verdict: read off its interval, as in its row
        (
            f"batch 1 / batch 2 per-patch throughput, worst norm ({setup})",
            f"{ratio.value:.2f}{interval} ({worst})",
            f">= {BATCH1_TARGET}",
            interval_verdict(ratio, BATCH1_TARGET, at_most=False),
        )
    )
    head = [
        "norm",
        "batch 1, PyTorch's path (cpu_conv=torch)",
        "batch 1, cpu_conv=auto",
        "batch 1, auto + channels_last_3d",
        "batch 2",
        "batch 1 / batch 2, PyTorch's path",
        "batch 1 / batch 2, auto [95 % interval] (per-pair min-max)",
        f">= {BATCH1_TARGET}",
        f"step = F + n c, ms: F / c (F / c; {BATCH1_TARGET} needs <= {max_fixed_per_sample():.2f})",
        "channels_last gain at batch 1",
    ]
    return "\n".join(
        [
            f"### Per-patch training time at batch 1 vs batch 2: {setup}",
            "",
            "`Run.train_step` on a pre-drawn batch, ms per training patch (median block; the blocks of the "
            "four variants side by side, in an order that reverses every round). Batch 2 runs as "
            "trainer.cpu_conv=auto and trainer.channels_last=auto train it (channels_last_3d except for "
            "instance); auto's routes never apply at batch 2. Throughput ratio = (ms per patch at batch 2) / "
            "(ms per patch at batch 1): geometric mean of the per-round ratios, with its 95 % interval. "
            "F and c split a step's time t_n = F + n c at batch n: F = 2 t1 - t2 is what every step pays once "
            "(each call's fixed cost, Python, the loss's and the optimizer's overhead), c = t2 - t1 what one more "
            f"sample adds (medians over the rounds); batch 1 reaches {BATCH1_TARGET}x batch 2 per patch exactly "
            f"when F <= {max_fixed_per_sample():.2f} c.",
            "",
            table(head, rows),
        ]
    )


def measure(ctx: Context, device: torch.device) -> str:
    title = "## e. Batch 1 on a CPU: the direct oneDNN conv, the oneDNN tensor and the depth split (trainer.cpu_conv)"
    if device.type != "cpu":
        return f"{title}\n\nSkipped: measured on {device.type}; trainer.cpu_conv is CPU-only (off on CUDA)."
    parts = [
        title,
        "",
        "PyTorch runs a conv3d of one sample on a CPU as `slow_conv3d`; `trainer.cpu_conv=auto` runs it in "
        "oneDNN instead (the direct conv: oneDNN's forward op, the backward written as forward convs; or the "
        "sample as a oneDNN tensor; or the depth split into a batch of two) where the layer tables below show "
        "it faster (norms/cpu_conv.py). `ATen backend` is what ATen picks for "
        "the layer at batch 1; the oneDNN op column calls `torch.ops.aten.mkldnn_convolution` directly (its "
        "backward still takes ATen's choice).",
    ]
    for overrides in ctx.profile.batch1_models:
        parts += ["", measure_layers(ctx, overrides)]
    for overrides in ctx.profile.batch1_models:
        parts += ["", measure_batch1_norms(ctx, overrides)]
    return "\n".join(parts)
