"""c. Per norm: step time and peak memory of Run.train_step at every batch size of the profile, and
channels_last_3d on/off per norm (what trainer.channels_last=auto decides from)."""

from __future__ import annotations

import torch

from benchmarks.common import (
    Context,
    Prepared,
    compose_cfg,
    describe_cfg,
    fmt,
    median,
    peak_memory,
    prepare,
    release_memory,
    table,
    timeit,
)
from norm_experiments.models.unet import ConvNormAct


def step_time_and_memory(ctx: Context, prep: Prepared) -> tuple[float, float]:
    """(median seconds per step, peak MiB) of Run.train_step on the prepared batch."""
    p = ctx.profile
    with peak_memory(prep.run.device) as mem:
        times = timeit({"step": prep.step()}, p.warmup, p.steps, p.repeats, prep.sync)
    return median(times["step"]), mem["mb"]


def measure_norm_cell(ctx: Context, overrides: list[str]) -> tuple[str, str, str, torch.device | None]:
    """(ms, MiB, setup, device) of one (norm, batch size); a config that cannot be built says why."""
    try:
        prep = prepare(ctx, overrides)
    except Exception as err:  # e.g. GroupNorm groups that do not divide a channel count
        return f"error: {err.__class__.__name__}", "", "", None
    seconds, peak = step_time_and_memory(ctx, prep)
    return fmt(seconds * 1e3), fmt(peak, 0), describe_cfg(prep.run.cfg).split(", batch")[0], prep.run.device


def measure(ctx: Context, device: torch.device) -> str:
    """Step time and peak memory of every norm of the profile at every batch size, then channels_last."""
    p = ctx.profile
    patch = [f"data.patch_size=[{','.join(map(str, p.norm_patch))}]"] if p.norm_patch else []
    ms: dict[str, list[str]] = {}
    mb: dict[str, list[str]] = {}
    setup, measured_on = "", device
    for norm in p.norms:
        ms[norm], mb[norm] = [], []
        for bs in p.batch_sizes:
            ctx.log(f"norms: {norm} at batch {bs}")
            cell_ms, cell_mb, cell_setup, cell_device = measure_norm_cell(
                ctx, [f"norm={norm}", f"data.batch_size={bs}", *patch]
            )
            ms[norm].append(cell_ms)
            mb[norm].append(cell_mb)
            setup, measured_on = cell_setup or setup, cell_device or measured_on
    release_memory(measured_on)
    head = ["norm", *[f"batch {b}" for b in p.batch_sizes]]
    if measured_on.type == "cuda":
        what = (
            "CUDA max_memory_allocated after reset_peak_memory_stats (absolute: weights, optimizer state, "
            "batch, activations)"
        )
    else:
        what = (
            "peak RSS during the steps (VmHWM, reset by writing 5 to /proc/self/clear_refs) minus the RSS "
            "before them, after gc and malloc_trim: activations, gradients, optimizer state, allocator slack"
        )
    return "\n".join(
        [
            "## c. Per norm: training step time and peak memory",
            "",
            f"{setup}; `Run.train_step` on a pre-drawn batch (batch = volumes per step, one patch each), "
            "in the memory format `trainer.channels_last=auto` picks (see the last table). "
            "The first steps (warm-up) include allocating the optimizer state.",
            "",
            "Step time (ms, median block):",
            "",
            table(head, [[n, *ms[n]] for n in p.norms]),
            "",
            f"Peak memory (MiB): {what}.",
            "",
            table(head, [[n, *mb[n]] for n in p.norms]),
            "",
            measure_channels_last(ctx),
        ]
    )


def first_norm_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    for module in model.modules():
        if isinstance(module, ConvNormAct):
            return module[1]
    return None


def keeps_channels_last(prep: Prepared) -> str:
    """Whether the first norm layer's output is still channels_last_3d (given a channels_last input)."""
    layer = first_norm_layer(prep.run.model)
    if layer is None or isinstance(layer, torch.nn.Identity):
        return "n/a (no norm layer)"
    seen: dict[str, bool] = {}

    def hook(module, args, out) -> None:
        seen["ok"] = out.is_contiguous(memory_format=torch.channels_last_3d)

    handle = layer.register_forward_hook(hook)
    prep.step()()
    handle.remove()
    return "yes" if seen.get("ok") else "no"


def channels_last_row(ctx: Context, norm: str) -> list[object]:
    p = ctx.profile
    ctx.log(f"channels_last_3d, norm={norm}")
    prep = prepare(ctx, [f"norm={norm}", "trainer.channels_last=false"])
    plain = median(timeit({"plain": prep.step()}, p.warmup, p.steps, p.repeats, prep.sync)["plain"])
    prep.run.model.to(memory_format=torch.channels_last_3d)
    prep.images = prep.images.contiguous(memory_format=torch.channels_last_3d)
    kept = keeps_channels_last(prep)
    cl = median(timeit({"cl": prep.step()}, p.warmup, p.steps, p.repeats, prep.sync)["cl"])
    return [norm, fmt(plain * 1e3), fmt(cl * 1e3), f"{plain / cl:.2f}x", kept]


def measure_channels_last(ctx: Context) -> str:
    rows = [channels_last_row(ctx, norm) for norm in ctx.profile.norms]
    head = [
        "norm",
        "contiguous ms",
        "channels_last_3d ms",
        "speed-up",
        "first norm's output stays channels_last",
    ]
    cfg = compose_cfg(ctx)
    return (
        "### channels_last_3d on/off per norm (model and input)\n\n"
        f"patch {'x'.join(map(str, cfg.data.patch_size))}, batch {cfg.data.batch_size}; "
        "what `trainer.channels_last=auto` decides from (`use_channels_last` in training/build.py).\n\n"
        + table(head, rows)
    )
