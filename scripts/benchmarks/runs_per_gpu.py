"""f. Several runs on one GPU: sweep throughput (runs per hour) with k = 1, 2, 4 runs sharing the GPU. Each k
is a real sweep of `norm-exp-train` (a joblib launcher with n_jobs = k, trainer.runs_per_gpu = k) over the
same runs, in a subprocess, timed from start to end. Skipped on a CPU unless --cuda-sections-anyway."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import Context, compose_cfg, describe_cfg, fmt, load_data_once, table, usable_cores
from norm_experiments import run_record

SWEEP_TIMEOUT_S = 900  # one sweep; a sweep that takes longer is reported as failed


def sweep_overrides(ctx: Context) -> list[str]:
    """The runs of every k: the profile's overrides, its sweep's, and --override."""
    return [*ctx.profile.overrides, *ctx.profile.gpu_sweep, *ctx.extra_overrides]


def sweep_command(ctx: Context, k: int, sweep_dir: Path) -> list[str]:
    seeds = ",".join(str(seed) for seed in range(ctx.profile.gpu_sweep_runs))
    return [
        sys.executable,
        "-m",
        "norm_experiments.train",
        "-m",
        *sweep_overrides(ctx),
        f"seed={seeds}",
        f"trainer.device={ctx.device}",
        f"trainer.runs_per_gpu={k}",
        # The CPU threads of the machine shared among the k runs, as for a CPU sweep.
        f"trainer.num_threads={max(1, usable_cores() // k)}",
        "trainer.progress=none",
        "hydra/launcher=joblib",
        f"hydra.launcher.n_jobs={k}",
        f"hydra.sweep.dir={sweep_dir}",
        "hydra.callbacks.report.enabled=false",  # the table and plots are not what is timed
    ]


def run_sweep(ctx: Context, k: int) -> tuple[float, list[dict], str]:
    """(wall seconds, the runs' records, the error's last lines or "") of the sweep with k runs at once."""
    sweep_dir = ctx.workdir / f"runs_per_gpu_{k}"
    command = sweep_command(ctx, k, sweep_dir)
    ctx.log(f"runs per GPU: k={k}: {' '.join(command[3:])}")
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command,
            cwd=ctx.workdir,
            capture_output=True,
            text=True,
            timeout=SWEEP_TIMEOUT_S,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        problem = "" if done.returncode == 0 else f"exit {done.returncode}: {done.stderr.strip()[-300:]}"
    except subprocess.TimeoutExpired:
        problem = f"timed out after {SWEEP_TIMEOUT_S} s"
    seconds = time.perf_counter() - start
    records = [run_record.read(p.parent) for p in sorted(sweep_dir.glob(f"*/{run_record.FILENAME}"))]
    return seconds, [r for r in records if r is not None], problem


def sweep_row(ctx: Context, k: int, base_rate: float | None) -> tuple[list[object], float | None]:
    seconds, records, problem = run_sweep(ctx, k)
    completed = [r for r in records if r.get("status") == "completed"]
    failed = len(records) - len(completed)
    if len(records) > ctx.profile.gpu_sweep_runs:  # a sweep parameter the overrides left open multiplies them
        problem = (
            f"{len(records)} runs instead of {ctx.profile.gpu_sweep_runs}: pin every swept key; {problem}"
        )
    rate = len(completed) / seconds * 3600 if completed else None
    peaks = [r["peak_cuda_memory_mb"] for r in completed if r.get("peak_cuda_memory_mb") is not None]
    row = [
        k,
        f"{len(completed)} of {ctx.profile.gpu_sweep_runs}" + (f" ({failed} failed)" if failed else ""),
        fmt(seconds),
        f"**{fmt(rate, 0)}**",
        f"{rate / base_rate:.2f}x" if rate and base_rate else "",
        fmt(statistics.median([r["wall_time_s"] for r in completed]) if completed else None),
        fmt(statistics.median([r["samples_per_s"] for r in completed]) if completed else None),
        fmt(max(peaks), 0) if peaks else "n/a",
        problem.replace("|", "/").replace("\n", " ") or "",
    ]
    return row, rate


def measure(ctx: Context, device: torch.device) -> str:
    title = "## f. Several runs on one GPU (trainer.runs_per_gpu)"
    if device.type != "cuda" and not ctx.cuda_sections_anyway:
        return f"{title}\n\nSkipped: measured on {device.type}; runs per GPU are pending a run on a GPU."
    p = ctx.profile
    cfg = compose_cfg(ctx, p.gpu_sweep)
    ctx.log("runs per GPU: the sweep's dataset (generated on first use)")
    load_data_once(cfg.data)  # so that no sweep pays for generating it
    rows, base = [], None
    for i, k in enumerate(p.gpu_runs_per_gpu):
        row, rate = sweep_row(ctx, k, base)
        base = rate if i == 0 else base
        rows.append(row)
    head = [
        "runs at once (k)",
        "runs completed",
        "sweep wall s",
        "runs/hour",
        f"vs k = {p.gpu_runs_per_gpu[0]}",
        "median run wall s",
        "median patches/s per run",
        "peak GPU MiB per run (max)",
        "problem",
    ]
    parts = [title, ""]
    if device.type != "cuda":
        parts.append(
            "**Run on a CPU with --cuda-sections-anyway: this only exercises the code (runs_per_gpu has no "
            "effect on a CPU); the numbers say nothing about GPUs.**\n"
        )
    parts += [
        f"{describe_cfg(cfg)}; {p.gpu_sweep_runs} runs (seeds 0-{p.gpu_sweep_runs - 1}) per sweep, the same "
        f"runs for every k. Each sweep: `norm-exp-train -m {' '.join(sweep_overrides(ctx))} seed=... "
        "trainer.runs_per_gpu=k hydra/launcher=joblib hydra.launcher.n_jobs=k` with trainer.num_threads = "
        f"{usable_cores()} cores / k, timed from start to end (process start-up, data loading, training, "
        "validation, writing); one sweep per k, so no interval. runs/hour = completed runs / sweep wall "
        "time.",
        "",
        table(head, rows),
    ]
    return "\n".join(parts)
