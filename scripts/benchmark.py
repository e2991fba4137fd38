#!/usr/bin/env python
"""Speed and memory benchmarks of the training code; what each number means is in docs/benchmarks.md.

    python scripts/benchmark.py --quick             # minutes on a 2-core CPU
    python scripts/benchmark.py                     # every norm at batch 1, 2, 4, 8 (longer)
    python scripts/benchmark.py --smoke             # about a minute: only checks that every measurement runs
    python scripts/benchmark.py --quick --device cuda --dry-run   # checks the command line; measures nothing

Everything runs in this one process on this one machine (f starts sweeps as subprocesses), and the tables
are printed and written to --out after every section. One module per section in scripts/benchmarks/:
  a. overhead.py: Run.train_step vs a bare PyTorch step, paired blocks until the ratio's 95 % interval is
     narrow (half-width <= 0.02; target: upper end <= 1.05)
  b. epoch.py: one epoch of our Run.loop vs (i) the MONAI 3D tutorial as written (CacheDataset + DataLoader
     with workers), (ii) MONAI's fast-training recipe (CacheDataset on the device + ThreadDataLoader) and an
     uncached Dataset; in quick and full also on 96x192x192 volumes
  c. norms.py: step time and peak memory per norm and batch size; channels_last_3d on/off per norm
  d. cuda.py: CUDA only: AMP vs fp32, torch.compile on/off, volumes cached on the device
  e. batch1.py: CPU only: batch 1 with trainer.cpu_conv (depth split, oneDNN tensor) vs batch 2
  f. runs_per_gpu.py: CUDA only: sweep throughput with k = 1, 2, 4 runs sharing the GPU (trainer.runs_per_gpu)
Compared variants are timed side by side in rounds whose order reverses every round; ratios are geometric
means of the per-round ratios with their 95 % interval. Torch's thread count stays at its default unless
--threads. Only the public training API is used (training.build: make_plan, build, Built; training.loop.Run).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import monai
import torch
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from benchmarks import batch1, cuda, epoch, norms, overhead, runs_per_gpu
from benchmarks.common import ALL_NORMS, Context, Profile, compose_cfg, table, usable_cores
from norm_experiments.config import validate_config
from norm_experiments.errors import OneLineParser, UserError, positive_int
from norm_experiments.training.build import make_plan

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "docs" / "benchmark_results.md"
SECTIONS = {  # --only name: the module that measures it
    "overhead": overhead,
    "epoch": epoch,
    "norms": norms,
    "cuda": cuda,
    "batch1": batch1,
    "runs_per_gpu": runs_per_gpu,
}
# (e): the quick sweep's model and patch (configs/experiment/norm_sweep_quick.yaml) beside the default
QUICK_SWEEP_MODEL = ("model.depth=2", "model.base_channels=8", "data.patch_size=[16,16,16]")
# (f): runs of the study's model and data (configs/experiment/norm_sweep.yaml) with a short budget. The preset
# sweeps two datasets; naming one here keeps each sweep at exactly gpu_sweep_runs runs (one per seed).
STUDY_RUN = (
    "experiment=norm_sweep",
    "data=synthetic",
    "norm=batch",
    "data.batch_size=2",
    "data.intensity=zscore",
    "trainer.validations=1",
    "trainer.eval_modes=false",
)

PROFILES = {
    "smoke": Profile(
        "smoke",
        ("experiment=smoke",),
        warmup=1,
        steps=1,
        repeats=1,
        epochs=2,
        overhead_norms=("batch",),
        norms=("batch", "instance"),
        batch_sizes=(1, 2),
        norm_patch=None,
        cuda_norms=("batch", "instance"),
        amp_batch_sizes=(2,),
        amp_patches=(None,),
        batch1_norms=("batch", "weightnorm"),
        overhead_min_rounds=3,
        overhead_cap_s=0.0,
        gpu_runs_per_gpu=(1, 2),
        gpu_sweep_runs=2,
    ),
    "quick": Profile(
        "quick",
        (),
        warmup=2,
        steps=2,
        repeats=5,
        epochs=5,
        overhead_norms=("batch",),
        norms=("batch", "instance", "group", "frn"),
        batch_sizes=(1, 2, 4),
        norm_patch=(16, 16, 16),
        cuda_norms=("batch",),  # compiling takes tens of seconds per norm
        amp_batch_sizes=(2, 8),
        amp_patches=(None, (64, 64, 64)),  # the GPU studies' patch (norm_study_gpu*)
        epoch_volume_shapes=((96, 192, 192),),
        batch1_norms=("batch", "instance", "group", "frn"),
        batch1_models=((), QUICK_SWEEP_MODEL),
        overhead_min_rounds=20,  # a few lucky rounds must not stop it early
        overhead_cap_s=150.0,
        gpu_runs_per_gpu=(1, 2, 4),
        gpu_sweep_runs=4,
        gpu_sweep=(*STUDY_RUN, "trainer.samples=200"),
    ),
    "full": Profile(
        "full",
        (),
        warmup=3,
        steps=3,
        repeats=5,
        epochs=5,
        overhead_norms=("batch", "batchrenorm", "group"),
        norms=ALL_NORMS,
        batch_sizes=(1, 2, 4, 8),
        norm_patch=None,
        cuda_norms=ALL_NORMS,
        amp_batch_sizes=(2, 8),
        amp_patches=(None, (96, 96, 96)),
        epoch_volume_shapes=((96, 192, 192),),
        batch1_norms=(*ALL_NORMS, "syncbatch"),
        batch1_models=((), QUICK_SWEEP_MODEL),
        overhead_min_rounds=20,  # a few lucky rounds must not stop it early
        overhead_cap_s=300.0,
        gpu_runs_per_gpu=(1, 2, 4, 8),
        gpu_sweep_runs=8,
        gpu_sweep=(*STUDY_RUN, "trainer.samples=1600"),
    ),
}


def machine_header(ctx: Context, device: torch.device) -> str:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = "none"
    if torch.cuda.is_available():
        cudnn = torch.backends.cudnn.version()
        gpu = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}, cuDNN {cudnn})"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    p = ctx.profile
    overrides = " ".join([*p.overrides, *ctx.extra_overrides]) or "none"
    lines = [
        f"- date: {now}",
        f"- CPU: {cpu}, {os.cpu_count()} cores ({usable_cores()} usable by this process); "
        f"load average (1, 5, 15 min) at start: {load_average()}",
        f"- GPU: {gpu}; measured on: {device.type}",
        f"- python {platform.python_version()}, torch {torch.__version__}, monai {monai.__version__}",
        f"- torch threads: {torch.get_num_threads()} intra-op / {torch.get_num_interop_threads()} inter-op "
        + ("(set by --threads)" if ctx.threads_set else "(torch's default, not set by the benchmark)"),
        f"- profile: {p.name} (warm-up {p.warmup} steps, blocks of {p.steps} steps, {p.repeats} rounds "
        f"where a section times a fixed number; {p.epochs} rounds of epochs in b); overrides: {overrides}",
    ]
    if device.type == "cuda":
        lines.append(
            f"- cudnn.benchmark set by Run.build (trainer.deterministic=false); TF32 for fp32 convs: "
            f"{torch.backends.cudnn.allow_tf32}, for fp32 matmuls: {torch.backends.cuda.matmul.allow_tf32}"
        )
    return "\n".join(lines)


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def out_problem(out: str) -> str | None:
    """Why --out cannot be written (checked before anything is measured, and by --dry-run), or None."""
    if out == "-":
        return None
    path = Path(out)
    if path.is_dir():
        return f"--out {out}: a folder; give the markdown file to write"
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        return f"--out {out}: cannot write into {parent} (no such folder, or not writable)"
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(
        prog="benchmark.py",
        description="Benchmark the training step, the data pipeline and every norm; writes markdown tables.",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_true",
        help="a subset (4 norms at batch 1, 2, 4 on 16^3 patches; 4 norms in e); minutes on a 2-core CPU",
    )
    size.add_argument(
        "--smoke",
        action="store_true",
        help="the smoke config, 1-2 steps per measurement: checks that everything runs (about a minute on 2 "
        "CPU cores); prints its tables and writes no file unless --out is given",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="markdown file to write, after every section (default: docs/benchmark_results.md; with --smoke, "
        "none); '-' prints only",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: cuda when available (default)",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=list(SECTIONS),
        help="run only these sections (repeatable); default: all",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Hydra override applied to every measurement (repeatable), e.g. model.base_channels=16",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=None,
        metavar="N",
        help="rounds where a section times a fixed number (default: the profile's); more: narrower intervals",
    )
    parser.add_argument(
        "--overhead-cap",
        type=non_negative,
        default=None,
        metavar="SECONDS",
        help="section a adds paired blocks until the interval is narrow or this long (default: the profile's)",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="N",
        help="torch.set_num_threads(N) first (default: leave torch's default, as training does)",
    )
    parser.add_argument(
        "--cuda-sections-anyway",
        action="store_true",
        help="run sections d and f on a CPU too (tests the code; their numbers mean nothing for GPUs)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the command line and that the config composes and validates, then exit: measures nothing",
    )
    args = parser.parse_args(argv)
    if args.out is None:  # smoke numbers measure nothing worth keeping: printed, never written over a report
        args.out = "-" if args.smoke else str(DEFAULT_OUT)
    return args


def choose_profile(args: argparse.Namespace) -> Profile:
    profile = PROFILES["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.repeats:
        profile = dataclasses.replace(profile, repeats=args.repeats)
    if args.overhead_cap is not None:
        profile = dataclasses.replace(profile, overhead_cap_s=args.overhead_cap)
    return profile


def write_report(
    out: str, command: str, started: float, header: str, ctx: Context, parts: list[str], left: list[str]
) -> str:
    """The markdown so far; written to `out` after every section, so that a stopped run keeps its tables."""
    summary = table(["measurement", "value", "target", "verdict"], [list(s) for s in ctx.summary])
    state = (
        f"Sections still to run: {', '.join(left)}."
        if left
        else f"Load average at the end: {load_average()}."
    )
    report = (
        "\n\n".join(
            [
                "# Benchmark results",
                f"Written by `python scripts/benchmark.py {command}` in {time.perf_counter() - started:.0f} s. "
                f"What each number means: docs/benchmarks.md. {state}",
                "## Machine\n\n" + header,
                "## Targets\n\n" + summary,
                *parts,
            ]
        )
        + "\n"
    )
    if out != "-":
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report)
    return report


def run_sections(args: argparse.Namespace, ctx: Context, command: str, started: float) -> str:
    device = make_plan(compose_cfg(ctx)).device
    header = machine_header(ctx, device)
    sections = args.only or list(SECTIONS)
    ctx.log(f"profile {ctx.profile.name} on {device.type}; sections: {', '.join(sections)}")
    parts: list[str] = []
    for i, name in enumerate(sections):
        parts.append(SECTIONS[name].measure(ctx, device))
        write_report(args.out, command, started, header, ctx, parts, sections[i + 1 :])
    return write_report(args.out, command, started, header, ctx, parts, [])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available() and not args.dry_run:
        print("benchmark: --device cuda, but no CUDA device is available", file=sys.stderr)
        return 2
    problem = out_problem(args.out)
    if problem:
        print(f"benchmark: {problem}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    command = " ".join(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="norm-exp-bench-") as workdir:
        ctx = Context(
            choose_profile(args),
            args.device,
            tuple(args.override),
            Path(workdir),
            args.cuda_sections_anyway,
            bool(args.threads),
        )
        try:
            if args.dry_run:
                validate_config(compose_cfg(ctx))
                sections = ", ".join(args.only or SECTIONS)
                print(
                    f"benchmark: dry run: profile {ctx.profile.name}, device {args.device}, sections {sections}, "
                    f"out {args.out}: the command line parses and the config composes and validates; nothing measured"
                )
                return 0
            report = run_sections(args, ctx, command, started)
        except (UserError, HydraException, OmegaConfBaseException) as err:
            print(f"error: {err}".splitlines()[0], file=sys.stderr)
            return 2
    print(report)
    if args.out != "-":
        ctx.log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
