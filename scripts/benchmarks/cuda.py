"""d. CUDA only: AMP (autocast) vs fp32 throughput and memory, torch.compile on/off, and the volumes cached
on the device (data.cache_on_device) vs in host memory. Skipped on a CPU unless --cuda-sections-anyway."""

from __future__ import annotations

import math

import torch

from benchmarks.common import (
    Context,
    compose_cfg,
    describe_cfg,
    fmt,
    interval_verdict,
    median,
    paired_ratio,
    paired_rounds,
    prepare,
    sync_fn,
    table,
    timed,
    timeit,
)
from benchmarks.epoch import our_epoch
from benchmarks.norms import step_time_and_memory

AMP_SPEEDUP_TARGET = 1.5
AMP_MEMORY_TARGET = 0.7


def amp_pair(ctx: Context, bs: int, patch: list[str]) -> tuple[list[object], tuple[str, str, str, str]]:
    """fp32 and AMP side by side (paired blocks), then the peak memory of each alone."""
    p = ctx.profile
    ctx.log(f"cuda: AMP vs fp32, batch {bs}, {patch or 'config patch'}")
    preps = {
        amp: prepare(ctx, [f"trainer.amp={amp}", f"data.batch_size={bs}", *patch])
        for amp in ("false", "true")
    }
    sync = preps["false"].sync
    times = timeit({amp: prep.step() for amp, prep in preps.items()}, p.warmup, p.steps, p.repeats, sync)
    peaks = {amp: step_time_and_memory(ctx, prep)[1] for amp, prep in preps.items()}
    amp_run = preps["true"].run
    dtype = str(amp_run.amp).replace("torch.", "") if amp_run.amp else "fp32"
    size = "x".join(map(str, amp_run.cfg.data.patch_size))
    speed, memory = paired_ratio(times["false"], times["true"]), peaks["true"] / peaks["false"]
    ok = interval_verdict(speed, AMP_SPEEDUP_TARGET, at_most=False)
    if memory > AMP_MEMORY_TARGET:
        ok = "MISSED"
    row = [
        size,
        bs,
        dtype,
        fmt(median(times["false"]) * 1e3),
        fmt(median(times["true"]) * 1e3),
        f"**{speed.text(2, 'x')}**",
        fmt(peaks["false"], 0),
        fmt(peaks["true"], 0),
        f"{memory:.2f}x",
        ok,
    ]
    target = f">= {AMP_SPEEDUP_TARGET}x, memory <= {AMP_MEMORY_TARGET}x"
    return row, (
        f"AMP vs fp32 (patch {size}, batch {bs})",
        f"{speed.text(2, 'x')}, memory {memory:.2f}x",
        target,
        ok,
    )


def measure_amp(ctx: Context) -> str:
    rows = []
    for patch in ctx.profile.amp_patches:
        override = [f"data.patch_size=[{','.join(map(str, patch))}]"] if patch else []
        for bs in ctx.profile.amp_batch_sizes:
            row, summary = amp_pair(ctx, bs, override)
            rows.append(row)
            if torch.cuda.is_available():  # the targets are about GPUs (autocast is off on a CPU)
                ctx.summary.append(summary)
    head = [
        "patch",
        "batch",
        "AMP dtype",
        "fp32 ms",
        "AMP ms",
        "throughput AMP/fp32 [95 % interval]",
        "fp32 MiB",
        "AMP MiB",
        "memory AMP/fp32",
        f"target >= {AMP_SPEEDUP_TARGET}x at <= {AMP_MEMORY_TARGET}x",
    ]
    return (
        "### AMP (autocast) vs fp32\n\n`Run.train_step` with trainer.amp=false and true, side by side in "
        f"{ctx.profile.repeats} rounds of paired blocks; peak memory of each alone (CUDA max_memory_allocated).\n\n"
        + table(head, rows)
    )


def compile_row(ctx: Context, norm: str) -> list[object]:
    """trainer.compile=false and true (build() compiles the training forward), side by side."""
    p = ctx.profile
    ctx.log(f"cuda: torch.compile, norm={norm}")
    eager = prepare(ctx, [f"norm={norm}", "trainer.compile=false"])
    try:
        compiled = prepare(ctx, [f"norm={norm}", "trainer.compile=true"])
        compile_s = timed(compiled.step(), compiled.sync)[0]  # the first call compiles
        times = timeit(
            {"eager": eager.step(), "compiled": compiled.step()}, p.warmup, p.steps, p.repeats, eager.sync
        )
    except Exception as err:  # no compiler / triton, or an op inductor cannot lower
        return [norm, "n/a", f"failed: {err.__class__.__name__}: {str(err)[:60]}", "n/a", "n/a"]
    finally:
        torch._dynamo.reset()  # the next norm compiles afresh (and its time is its own)
    speed = paired_ratio(times["eager"], times["compiled"])
    return [
        norm,
        fmt(median(times["eager"]) * 1e3),
        fmt(median(times["compiled"]) * 1e3),
        f"**{speed.text(2, 'x')}**",
        fmt(compile_s),
    ]


def measure_compile(ctx: Context) -> str:
    rows = [compile_row(ctx, norm) for norm in ctx.profile.cuda_norms]
    head = ["norm", "eager ms", "compiled ms", "speed-up [95 % interval]", "compile s (first step)"]
    return (
        "### torch.compile on/off (trainer.compile: the training forward; loss and optimizer step eager)\n\n"
        f"Blocks of both side by side, {ctx.profile.repeats} rounds, after the first (compiling) step.\n\n"
        + table(head, rows)
    )


def measure_device_cache(ctx: Context) -> str:
    """Epochs of Run.loop with the cached volumes in host memory (a pinned batch copied every step) against
    volumes kept on the GPU and cut there (data.cache_on_device=true), side by side."""
    p = ctx.profile
    runs = {where: prepare(ctx, [f"data.cache_on_device={where}"]).run for where in ("false", "true")}
    bs = int(runs["false"].cfg.data.batch_size)
    steps = math.ceil(len(runs["false"].data.train) / bs)
    waits: dict[str, list[float]] = {"false": [], "true": []}
    for run in runs.values():
        our_epoch(run, min(steps, max(1, p.warmup)))  # warm-up: allocator, cudnn.benchmark

    def epoch(where: str) -> float:
        seconds, state = timed(lambda: our_epoch(runs[where], steps), sync_fn(runs[where].device))
        waits[where].append(state.data_wait_seconds / max(state.train_seconds, 1e-9))
        return seconds

    ctx.log(f"cuda: cached volumes on the host vs on the device, {p.epochs} rounds")
    times = paired_rounds({where: (lambda w=where: epoch(w)) for where in runs}, p.epochs)
    rows = []
    for where, label in (("false", "host memory (pinned batch, async copy)"), ("true", "on the device")):
        run = runs[where]
        draw = median([timed(lambda run=run: run.sampler.batch(1), sync_fn(run.device))[0] for _ in range(5)])
        rows.append(
            [
                label,
                fmt(median(times[where]), 2),
                fmt(median(times[where]) / steps * 1e3),
                f"{median(waits[where]):.1%}",
                fmt(draw * 1e3, 2),
            ]
        )
    speed = paired_ratio(times["false"], times["true"])
    head = ["cached volumes in", "s/epoch (median)", "ms/step", "data wait / step", "ms to draw one batch"]
    return "\n".join(
        [
            "### Cached volumes on the device (data.cache_on_device) vs in host memory",
            "",
            f"{steps} steps per epoch, {p.epochs} rounds of one epoch each, side by side; the real Run.loop "
            "with its prefetch thread.",
            "",
            table(head, rows),
            "",
            f"Epoch speed-up from keeping the volumes on the device: **{speed.text(2, 'x')}** (95 % interval).",
        ]
    )


def measure(ctx: Context, device: torch.device) -> str:
    title = "## d. CUDA only: AMP, torch.compile, volumes cached on the device"
    if device.type != "cuda" and not ctx.cuda_sections_anyway:
        return f"{title}\n\nSkipped: measured on {device.type}. These numbers are pending a run on a GPU."
    parts = [title, ""]
    if device.type != "cuda":
        parts.append(
            "**Run on a CPU with --cuda-sections-anyway: this only exercises the code; the numbers say "
            "nothing about GPUs (autocast is off on CPU, so 'AMP' is fp32 here).**\n"
        )
    parts += [
        describe_cfg(compose_cfg(ctx)) + " unless stated.",
        "",
        measure_amp(ctx),
        "",
        measure_compile(ctx),
        "",
        measure_device_cache(ctx),
    ]
    return "\n".join(parts)
