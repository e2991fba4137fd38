#!/usr/bin/env python
"""Speed and memory benchmarks of the training code; what each number means is in docs/benchmarks.md.

    python scripts/benchmark.py --quick             # 1-2 minutes on an idle 2-core CPU (<= 5)
    python scripts/benchmark.py                     # every norm at batch 1, 2, 4, 8 (longer)
    python scripts/benchmark.py --smoke --out -     # seconds: only checks that every measurement runs

Everything runs in this one process on this one machine, and the tables are printed and written to --out:
  a. overhead ratio: Run.train_step vs a bare PyTorch step on the same model and batch (target <= 1.05)
  b. one epoch of our pipeline (the real Run._loop: cached volumes, patches cut with tensor ops) vs a
     MONAI-tutorial pipeline (Dataset without cache, DataLoader, NIfTI read every step) (target >= 2x), and
     our data wait; in quick and full also on 96x192x192 volumes
  c. step time and peak memory per norm and batch size; channels_last_3d on/off per norm
  d. CUDA only: AMP (bf16) vs fp32, torch.compile on/off, volumes cached on the device
     (data.cache_on_device) vs in host memory
Timing: warm-up steps first, then `repeats` blocks of `steps` steps, synchronized on CUDA at the end of each
block; the median block gives the time per step. Torch's thread count stays at its default unless --threads.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import gc
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import monai
import torch
from hydra import compose, initialize_config_dir
from monai.losses import DiceCELoss
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    SpatialPadd,
)
from omegaconf import DictConfig, OmegaConf, open_dict

from norm_experiments.config import CONFIG_DIR, register_resolvers
from norm_experiments.data.layouts import find_cases, split_cases
from norm_experiments.data.pipeline import dataset_root
from norm_experiments.models import build_model
from norm_experiments.models.unet import ConvNormAct
from norm_experiments.norms import BNStatMonitor
from norm_experiments.norms.bn_common import tracks_running_stats
from norm_experiments.training import loop as loop_module
from norm_experiments.training.loop import InlineExecutor, Run, State, make_optimizer, prefetch_pool
from norm_experiments.training.outputs import peak_rss_mb, reset_peak_rss
from norm_experiments.training.progress import Progress

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "docs" / "benchmark_results.md"
ALL_NORMS = (
    "batch",
    "instance",
    "group",
    "layer",
    "batchrenorm",
    "ghostbatch",
    "ws_group",
    "weightnorm",
    "frn",
    "none",
)
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # as the pipeline (silences MONAI's deprecation warning)
SECTIONS = ("overhead", "epoch", "norms", "cuda")

# Targets (docs/benchmarks.md explains each).
OVERHEAD_TARGET = 1.05
EPOCH_SPEEDUP_TARGET = 2.0
DATA_WAIT_TARGET = 0.05
AMP_SPEEDUP_TARGET = 1.5
AMP_MEMORY_TARGET = 0.7
# Section b is repeated on larger synthetic volumes (still about 1/7 of a 512x512x90 CT): reading and
# cropping a volume costs more with its size, a training patch does not. Cases of that size: 6 train, 2 val.
LARGE_VOLUME_CASES = 8


@dataclass(frozen=True)
class Profile:
    """How much to measure: --smoke (seconds), --quick (minutes on a 2-core CPU) or the full run."""

    name: str
    overrides: tuple[str, ...]  # Hydra overrides applied to every measurement
    warmup: int  # untimed steps before timing
    steps: int  # timed steps per block
    repeats: int  # timed blocks; the median block is reported
    epochs: int  # timed epochs per pipeline in (b)
    overhead_norms: tuple[str, ...]
    norms: tuple[str, ...]  # (c)
    batch_sizes: tuple[int, ...]  # (c)
    norm_patch: tuple[int, ...] | None  # patch of (c); None: the config's
    cuda_norms: tuple[str, ...]  # (d): compile
    amp_batch_sizes: tuple[int, ...]  # (d): AMP vs fp32
    amp_patches: tuple[tuple[int, ...] | None, ...]  # (d): None = the config's patch
    epoch_volume_shapes: tuple[tuple[int, ...], ...] = ()  # (b) again on synthetic volumes of these shapes


PROFILES = {
    "smoke": Profile(
        "smoke",
        ("experiment=smoke",),
        warmup=1,
        steps=1,
        repeats=1,
        epochs=1,
        overhead_norms=("batch",),
        norms=("batch", "instance"),
        batch_sizes=(1, 2),
        norm_patch=None,
        cuda_norms=("batch", "instance"),
        amp_batch_sizes=(2,),
        amp_patches=(None,),
    ),
    "quick": Profile(
        "quick",
        (),
        warmup=2,
        steps=2,
        repeats=5,
        epochs=2,
        overhead_norms=("batch",),
        norms=("batch", "instance", "group", "frn"),
        batch_sizes=(1, 2, 4),
        norm_patch=(16, 16, 16),
        cuda_norms=("batch", "instance", "group", "frn"),
        amp_batch_sizes=(2, 8),
        amp_patches=(None,),
        epoch_volume_shapes=((96, 192, 192),),
    ),
    "full": Profile(
        "full",
        (),
        warmup=3,
        steps=3,
        repeats=5,
        epochs=3,
        overhead_norms=("batch", "batchrenorm", "group"),
        norms=ALL_NORMS,
        batch_sizes=(1, 2, 4, 8),
        norm_patch=None,
        cuda_norms=ALL_NORMS,
        amp_batch_sizes=(2, 8),
        amp_patches=(None, (96, 96, 96)),
        epoch_volume_shapes=((96, 192, 192),),
    ),
}


@dataclass
class Context:
    profile: Profile
    device: str  # trainer.device override: auto | cpu | cuda
    extra_overrides: tuple[str, ...]
    workdir: Path
    cuda_sections_anyway: bool = False
    threads_set: bool = False
    summary: list[tuple[str, str, str, str]] = field(default_factory=list)  # (what, value, target, verdict)

    def log(self, message: str) -> None:
        print(f"[benchmark] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ helpers


def compose_cfg(ctx: Context, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config `norm-exp-train` would build: profile overrides, then --override, then the measurement's."""
    register_resolvers()
    every = [*ctx.profile.overrides, f"trainer.device={ctx.device}", *ctx.extra_overrides, *overrides]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=every)
    with open_dict(cfg):
        cfg.trainer.progress = "none"
    return cfg


_VOLUMES: dict[str, object] = {}


def _load_data_once(data_cfg: DictConfig):
    """load_data, cached per data config: the cached volumes do not depend on the batch size, and
    rebuilding them for every (norm, batch size) would cost more than the measurement itself."""
    plain = OmegaConf.to_container(data_cfg, resolve=True)
    for key in ("batch_size", "patches_per_volume", "foreground_fraction", "augment"):
        plain.pop(key, None)
    key = repr(sorted(plain.items()))
    if key not in _VOLUMES:
        _VOLUMES[key] = _real_load_data(data_cfg)
    return _VOLUMES[key]


_real_load_data = loop_module.load_data
loop_module.load_data = _load_data_once  # benchmark process only


def build_run(ctx: Context, overrides: list[str] | tuple[str, ...] = ()) -> Run:
    run = Run(compose_cfg(ctx, overrides), ctx.workdir)
    run.build()
    return run


def sync_fn(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def timed_block(fn: Callable[[], object], steps: int, sync: Callable[[], None]) -> float:
    """Seconds per call of fn over `steps` calls (device work included)."""
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - start) / steps


def timeit(
    fns: dict[str, Callable[[], object]], warmup: int, steps: int, repeats: int, sync: Callable[[], None]
) -> dict[str, list[float]]:
    """Per-step seconds of each block for every fn; blocks of the fns alternate (A B A B ...) so that a
    change in the machine's load hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed_block(fn, steps, sync))
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def release_memory(device: torch.device) -> None:
    """Free what earlier measurements left, so that the next peak-memory reading starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back, so RSS deltas are honest


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Yields a dict whose "mb" is, afterwards, the peak memory of the block: CUDA max_memory_allocated
    (absolute), or on CPU the peak RSS (VmHWM, reset via /proc/self/clear_refs) minus the RSS at the start."""
    release_memory(device)
    result = {"mb": float("nan")}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()
        start = rss_mb()
    yield result
    if device.type == "cuda":
        torch.cuda.synchronize()
        result["mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        result["mb"] = peak_rss_mb() - start


def fmt(value: float, digits: int = 1) -> str:
    return (
        "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"
    )


def table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def machine_header(ctx: Context, device: torch.device) -> str:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = "none"
    if torch.cuda.is_available():
        cudnn = torch.backends.cudnn.version()
        gpu = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}, cuDNN {cudnn})"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    p = ctx.profile
    overrides = " ".join([*p.overrides, *ctx.extra_overrides]) or "none"
    lines = [
        f"- date: {now}",
        f"- CPU: {cpu}, {os.cpu_count()} cores ({usable} usable by this process); "
        f"load average at start: {load}",
        f"- GPU: {gpu}; measured on: {device.type}",
        f"- python {platform.python_version()}, torch {torch.__version__}, monai {monai.__version__}",
        f"- torch threads: {torch.get_num_threads()} intra-op / {torch.get_num_interop_threads()} inter-op "
        + ("(set by --threads)" if ctx.threads_set else "(torch's default, not set by the benchmark)"),
        f"- profile: {p.name} (warm-up {p.warmup} steps, then {p.repeats} blocks of {p.steps} steps, "
        f"median block; blocks of compared variants alternate); overrides: {overrides}",
    ]
    if device.type == "cuda":
        lines.append(
            f"- cudnn.benchmark set by Run.build (trainer.deterministic=false); TF32 for fp32 convs: "
            f"{torch.backends.cudnn.allow_tf32}, for fp32 matmuls: {torch.backends.cuda.matmul.allow_tf32}"
        )
    return "\n".join(lines)


def describe_cfg(cfg: DictConfig) -> str:
    m = cfg.model
    model = f"{m.name} depth {m.depth} base {m.base_channels}" if m.name == "unet" else str(m.name)
    patch = "x".join(map(str, cfg.data.patch_size))
    return (
        f"model {model}, patch {patch}, batch {cfg.data.batch_size} x {cfg.data.patches_per_volume} "
        f"patch(es), norm {cfg.norm.name}, optimizer {cfg.optim.name}"
    )


# ------------------------------------------------------------------------------ (a) overhead ratio


@dataclass
class Prepared:
    """A built Run and one real training batch (sampler step 0), already on the Run's device."""

    run: Run
    images: torch.Tensor
    labels: torch.Tensor

    def step(self) -> Callable[[], object]:
        return lambda: self.run.train_step(self.images, self.labels)

    @property
    def sync(self) -> Callable[[], None]:
        return sync_fn(self.run.device)


def prepare(ctx: Context, overrides: list[str] | tuple[str, ...] = ()) -> Prepared:
    run = build_run(ctx, overrides)
    images, labels = run.sampler.batch(0)
    images = images.to(run.device, memory_format=run.memory_format)  # as Run._loop moves it
    labels = labels.to(run.device)
    return Prepared(run, images, labels)


def twin_model(run: Run, same_layout: bool = True) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The Run's model built again the same way, with the same initial weights, and the same optimizer;
    in the Run's memory format (trainer.channels_last), or the plain one a tutorial would use."""
    model = build_model(run.cfg.model, run.spec, run.data.info.num_channels, run.num_classes).to(run.device)
    model.load_state_dict(run.model.state_dict())
    if same_layout:
        model.to(memory_format=run.memory_format)
    return model, make_optimizer(run.cfg.optim, model, run.lr)


def bare_step(prep: Prepared) -> Callable[[], None]:
    """The bare PyTorch step, at the Run's precision (bf16 autocast on CUDA, fp32 on CPU)."""
    model, optimizer = twin_model(prep.run)
    model.train()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    def step() -> None:
        optimizer.zero_grad()
        with prep.run.autocast():
            loss = loss_fn(model(prep.images), prep.labels)
        loss.backward()
        optimizer.step()

    return step


def monitored_step(prep: Prepared, monitor: BNStatMonitor) -> Callable[[], None]:
    """Run.train_step with the BN statistics hooks on, as Run._loop runs it on every step."""

    def step() -> None:
        monitor.enabled = True
        prep.run.train_step(prep.images, prep.labels)
        monitor.enabled = False

    return step


def overhead_rows(ctx: Context, norm: str) -> tuple[str, list[list[object]]]:
    p = ctx.profile
    prep = prepare(ctx, [f"norm={norm}"])
    fns = {"bare": bare_step(prep), "ours": prep.step()}
    monitor = BNStatMonitor(prep.run.model)
    monitor.enabled = False
    if any(tracks_running_stats(m) for m in prep.run.model.modules()):
        fns["monitored"] = monitored_step(prep, monitor)
    ctx.log(f"overhead: norm={norm}, variants {', '.join(fns)}")
    times = timeit(fns, p.warmup, p.steps, p.repeats, prep.sync)
    monitor.close()
    bare_s = median(times["bare"])
    rows: list[list[object]] = [[norm, "bare PyTorch", fmt(bare_s * 1e3), "1.000", "1.000", "", ""]]
    labels = {
        "ours": "Run.train_step",
        "monitored": "Run.train_step + BNStatMonitor hooks (Run._loop: logged steps only)",
    }
    for name in [n for n in fns if n != "bare"]:
        ratio = median(times[name]) / bare_s
        paired = [a / b for a, b in zip(times[name], times["bare"], strict=True)]
        ok = ratio <= OVERHEAD_TARGET
        if name == "ours":
            ctx.summary.append(
                (f"overhead ratio ({norm})", f"{ratio:.3f}", f"<= {OVERHEAD_TARGET}", verdict(ok))
            )
        spread = f"{min(paired):.3f}-{max(paired):.3f}"
        best = f"{min(times[name]) / min(times['bare']):.3f}"
        rows.append(
            [norm, labels[name], fmt(median(times[name]) * 1e3), f"{ratio:.3f}", best, spread, verdict(ok)]
        )
    return describe_cfg(prep.run.cfg), rows


def measure_overhead(ctx: Context) -> str:
    """Run.train_step vs the bare PyTorch step on the same model (same init), the same batch and device."""
    rows, setups = [], []
    for norm in ctx.profile.overhead_norms:
        setup, norm_rows = overhead_rows(ctx, norm)
        setups.append(setup.split(", norm")[0])
        rows += norm_rows
    head = [
        "norm",
        "step",
        "ms/step (median)",
        "ratio to bare",
        "ratio of fastest blocks",
        "paired blocks min-max",
        f"<= {OVERHEAD_TARGET}",
    ]
    return "\n".join(
        [
            "## a. Overhead ratio: our training step vs a bare PyTorch loop",
            "",
            f"{'; '.join(sorted(set(setups)))}. Same initial weights, the same pre-drawn batch on the "
            "device, the same optimizer; bare = "
            "`opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()`. "
            "For BatchNorm-family norms a third row adds the BN statistics hooks (`BNStatMonitor`), which "
            "`Run._loop` enables only on the steps it logs (1 in trainer.log_every_steps).",
            "",
            table(head, rows),
        ]
    )


# ------------------------------------------------------------------- (b) epoch vs MONAI tutorial


def tutorial_loader(cfg: DictConfig) -> monai.data.DataLoader:
    """The MONAI-tutorial pipeline: Dataset without cache, every transform (NIfTI read included) every
    step, RandCropByPosNegLabeld without precomputed indices, DataLoader(num_workers=0)."""
    layout, root = dataset_root(cfg.data)
    cases, _ = find_cases(layout, root)
    val_cases = list(cfg.data.val_cases) if cfg.data.val_cases else None
    train_cases, _ = split_cases(cases, cfg.data.val_fraction, cfg.data.split_seed, val_cases)
    files = [{"image": [str(p) for p in c.images], "label": str(c.label)} for c in train_cases]
    keys, d = ("image", "label"), cfg.data
    steps = [
        LoadImaged(keys, image_only=True),
        EnsureChannelFirstd(keys),
        Orientationd(keys, axcodes="RAS", labels=RAS_LABELS),
    ]
    if d.intensity == "zscore":
        steps.append(NormalizeIntensityd("image", channel_wise=True))
    if d.pad_to_patch:
        steps.append(SpatialPadd(keys, spatial_size=list(d.patch_size)))
    fg = float(d.foreground_fraction)
    steps += [
        RandCropByPosNegLabeld(
            keys, "label", list(d.patch_size), pos=fg, neg=1.0 - fg, num_samples=int(d.patches_per_volume)
        ),
        *[RandFlipd(keys, prob=d.augment.flip_prob, spatial_axis=a) for a in range(3)],
        RandRotate90d(keys, prob=d.augment.rot90_prob, spatial_axes=(1, 2)),
    ]
    dataset = monai.data.Dataset(files, transform=Compose(steps))
    return monai.data.DataLoader(dataset, batch_size=int(d.batch_size), shuffle=True, num_workers=0)


def tutorial_epoch(
    loader, model, optimizer, loss_fn, device: torch.device, limit: int | None = None
) -> float:
    """The tutorial's training loop over the loader (loss.item() every step); returns the summed loss."""
    epoch_loss = 0.0
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            break
        inputs, labels = batch["image"].to(device), batch["label"].to(device)
        optimizer.zero_grad()
        loss = loss_fn(model(inputs), labels)
        loss.backward()
        optimizer.step()
        epoch_loss += loss.item()
    return epoch_loss


class _NullWriter:
    def add_scalar(self, *args, **kwargs) -> None:
        pass

    add_image = add_scalar


def our_epoch(run: Run, steps: int, prefetch: bool | None = None) -> State:
    """One pass of the real Run._loop (BN monitor on logged steps, logging every log_every_steps), without
    validation or checkpoints; returns the loop's State (train and data-wait seconds). The next batch is cut
    where training cuts it (Run.batch_executor: a thread on CUDA, inline on a CPU) unless `prefetch` says
    True (a thread) or False (inline), to show what the other choice would cost."""
    run.state = State()
    run.total_steps = steps
    run.val_steps, run.ckpt_every = set(), 10**9
    monitor = BNStatMonitor(run.model)
    progress = Progress(steps, 0, "none", "benchmark")
    if prefetch is None:
        executor = run.batch_executor()
    else:
        executor = prefetch_pool() if prefetch else InlineExecutor()
    with executor:
        run._loop(_NullWriter(), monitor, progress, SimpleNamespace(requested=False), executor)
    monitor.close()
    return run.state


def timed(fn: Callable[[], object], sync: Callable[[], None]) -> tuple[float, object]:
    """(wall seconds, result) of one call, device work included."""
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - start, result


def measure_epoch(ctx: Context, volume_shape: tuple[int, ...] | None = None) -> str:
    """Section b on the config's volumes, or on synthetic volumes of `volume_shape` (8 cases)."""
    p = ctx.profile
    overrides: list[str] = []
    if volume_shape is not None:
        shape = ",".join(map(str, volume_shape))
        overrides = [f"data.synthetic.shape=[{shape}]", f"data.synthetic.num_cases={LARGE_VOLUME_CASES}"]
        ctx.log(f"epoch: synthetic volumes of {volume_shape} (generated on first use)")
    _VOLUMES.clear()  # time the cache build too: the one-off cost of our pipeline
    build_s, prep = timed(lambda: prepare(ctx, overrides), lambda: None)
    run, sync = prep.run, prep.sync
    cfg, device = run.cfg, run.device
    bs, ppv = int(cfg.data.batch_size), int(cfg.data.patches_per_volume)
    steps = math.ceil(len(run.data.train) / bs)
    loader = tutorial_loader(cfg)
    model, optimizer = twin_model(run, same_layout=False)  # a tutorial trains the plain layout
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    # The sampler alone (no overlap with training): what each step waits for, or what a thread must hide.
    draw = [timed(lambda: run.sampler.batch(0), lambda: None)[0] for _ in range(max(3, p.steps))]
    # The tutorial's data work alone (read, transform, collate): what it adds to every training step.
    loading = timed(lambda: sum(1 for _ in loader), lambda: None)[0] / len(loader)
    ctx.log(f"epoch: {len(run.data.train)} training cases, {steps} steps per epoch, {p.epochs} epochs each")
    for _ in range(p.warmup):
        prep.step()()
    tutorial_epoch(loader, model, optimizer, loss_fn, device, limit=p.warmup)

    threaded = device.type == "cuda"  # where Run.batch_executor cuts the next batch
    ours, other, tutorial, waits = [], [], [], []
    for _ in range(p.epochs):  # the three pipelines alternate
        seconds, state = timed(lambda: our_epoch(run, steps), sync)
        ours.append(seconds)
        waits.append(state.data_wait_seconds / max(state.train_seconds, 1e-9))
        other.append(timed(lambda: our_epoch(run, steps, prefetch=not threaded), sync)[0])
        tutorial.append(timed(lambda: tutorial_epoch(loader, model, optimizer, loss_fn, device), sync)[0])
    speedup, wait = median(tutorial) / median(ours), median(waits)
    our_step = median(ours) / steps
    volumes = "x".join(map(str, run.data.train[0].image.shape[1:]))
    suffix = "" if volume_shape is None else f", volumes {volumes}"
    ctx.summary.append(
        (
            f"epoch speed-up vs tutorial{suffix}",
            f"{speedup:.2f}x",
            f">= {EPOCH_SPEEDUP_TARGET}x",
            verdict(speedup >= EPOCH_SPEEDUP_TARGET),
        )
    )
    ctx.summary.append(
        (
            f"data-wait fraction{suffix}",
            f"{wait:.1%}",
            f"< {DATA_WAIT_TARGET:.0%}",
            verdict(wait < DATA_WAIT_TARGET),
        )
    )

    def row(name: str, patches: int, times: list[float], n_steps: int, wait_text: str) -> list[object]:
        return [
            name,
            patches,
            fmt(median(times), 2),
            fmt(min(times), 2),
            fmt(median(times) / n_steps * 1e3),
            wait_text,
        ]

    ours_patches = steps * bs * ppv
    rows = [
        row(
            f"ours: Run._loop, cached volumes, next batch cut {'in a thread' if threaded else 'inline'} "
            f"(the default on {device.type})",
            ours_patches,
            ours,
            steps,
            f"{wait:.1%}",
        ),
        row(
            f"ours with the next batch cut {'inline' if threaded else 'in a prefetch thread'} instead",
            ours_patches,
            other,
            steps,
            "",
        ),
        row(
            "tutorial: Dataset (no cache), DataLoader(num_workers=0)",
            len(loader.dataset) * ppv,
            tutorial,
            len(loader),
            "n/a",
        ),
    ]
    head = ["pipeline", "patches/epoch", "s/epoch (median)", "s/epoch (min)", "ms/step", "data wait / step"]
    precision = "bf16 autocast" if run.amp else "fp32"
    return "\n".join(
        [
            f"## b. One epoch: our pipeline vs a MONAI-tutorial-style pipeline{suffix}",
            "",
            f"{describe_cfg(cfg)}; volumes {volumes} after preprocessing; {len(loader.dataset)} training cases, {p.epochs} epoch(s) of each "
            f"pipeline, alternating. Ours runs at {precision}; the tutorial in fp32 with `loss.item()` "
            "every step, as the tutorials do (LoadImaged, EnsureChannelFirstd, Orientationd, "
            "RandCropByPosNegLabeld without precomputed indices, flips, rot90 on every step).",
            "",
            table(head, rows),
            "",
            f"Speed-up (tutorial / ours, median epochs): **{speedup:.2f}x** "
            f"(target >= {EPOCH_SPEEDUP_TARGET}x: {verdict(speedup >= EPOCH_SPEEDUP_TARGET)}). "
            "Data-wait fraction (time blocked on the next batch / step time, from Run._loop's own counters): "
            f"**{wait:.1%}** (target < {DATA_WAIT_TARGET:.0%}: {verdict(wait < DATA_WAIT_TARGET)}).",
            f"Drawing one batch from the cache alone (no overlap with training): {fmt(median(draw) * 1e3)} "
            f"ms ({fmt(median(draw) / (bs * ppv) * 1e3)} ms per patch). One-off cost of building the Run "
            f"(caching every case, file checks, model): {build_s:.1f} s.",
            f"The tutorial loader alone (NIfTI read, transforms, collate; no training) takes "
            f"{fmt(loading * 1e3)} ms per batch, against {fmt(our_step * 1e3)} ms per step of ours: a "
            f"pipeline that hid all data work could be about {fmt(1 + loading / our_step, 2)}x faster than "
            "the tutorial on this setup, no more.",
        ]
    )


# ----------------------------------------------------------------------------------- (c) per norm


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


def measure_norms(ctx: Context) -> str:
    p = ctx.profile
    patch = [f"data.patch_size=[{','.join(map(str, p.norm_patch))}]"] if p.norm_patch else []
    ms: dict[str, list[str]] = {}
    mb: dict[str, list[str]] = {}
    setup, device = "", torch.device("cpu")
    for norm in p.norms:
        ms[norm], mb[norm] = [], []
        for bs in p.batch_sizes:
            ctx.log(f"norms: {norm} at batch {bs}")
            cell_ms, cell_mb, cell_setup, cell_device = measure_norm_cell(
                ctx, [f"norm={norm}", f"data.batch_size={bs}", *patch]
            )
            ms[norm].append(cell_ms)
            mb[norm].append(cell_mb)
            setup, device = cell_setup or setup, cell_device or device
    release_memory(device)
    head = ["norm", *[f"batch {b}" for b in p.batch_sizes]]
    if device.type == "cuda":
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


# ------------------------------------------------------------------------------------ (d) CUDA only


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


def amp_pair(ctx: Context, bs: int, patch: list[str]) -> tuple[list[object], tuple[str, str, str, str]]:
    result = {}
    for amp in (False, True):
        ctx.log(f"cuda: amp={amp}, batch {bs}, {patch or 'config patch'}")
        prep = prepare(ctx, [f"trainer.amp={str(amp).lower()}", f"data.batch_size={bs}", *patch])
        seconds, peak = step_time_and_memory(ctx, prep)
        result[amp] = (seconds, peak, str(prep.run.amp).replace("torch.", "") if prep.run.amp else "fp32")
        size = "x".join(map(str, prep.run.cfg.data.patch_size))
    (f_s, f_mb, _), (a_s, a_mb, dtype) = result[False], result[True]
    speed, memory = f_s / a_s, a_mb / f_mb
    ok = verdict(speed >= AMP_SPEEDUP_TARGET and memory <= AMP_MEMORY_TARGET)
    row = [
        size,
        bs,
        dtype,
        fmt(f_s * 1e3),
        fmt(a_s * 1e3),
        f"{speed:.2f}x",
        fmt(f_mb, 0),
        fmt(a_mb, 0),
        f"{memory:.2f}x",
        ok,
    ]
    target = f">= {AMP_SPEEDUP_TARGET}x, <= {AMP_MEMORY_TARGET}x"
    return row, (f"AMP vs fp32 (patch {size}, batch {bs})", f"{speed:.2f}x, memory {memory:.2f}x", target, ok)


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
        "throughput AMP/fp32",
        "fp32 MiB",
        "AMP MiB",
        "memory AMP/fp32",
        f"target >= {AMP_SPEEDUP_TARGET}x at <= {AMP_MEMORY_TARGET}x",
    ]
    return "### AMP (autocast) vs fp32\n\n" + table(head, rows)


def compile_row(ctx: Context, norm: str) -> list[object]:
    p = ctx.profile
    ctx.log(f"cuda: torch.compile, norm={norm}")
    prep = prepare(ctx, [f"norm={norm}"])
    eager = median(timeit({"eager": prep.step()}, p.warmup, p.steps, p.repeats, prep.sync)["eager"])
    try:
        prep.run.net = torch.compile(prep.run.net)  # what train_step calls (the model, or its DDP wrapper)
        compile_s = timed(prep.step(), prep.sync)[0]  # the first call compiles
        compiled = median(
            timeit({"compiled": prep.step()}, p.warmup, p.steps, p.repeats, prep.sync)["compiled"]
        )
    except Exception as err:  # no compiler / triton, or an op inductor cannot lower
        return [norm, fmt(eager * 1e3), f"failed: {err.__class__.__name__}: {str(err)[:60]}", "n/a", "n/a"]
    finally:
        torch._dynamo.reset()
    return [norm, fmt(eager * 1e3), fmt(compiled * 1e3), f"{eager / compiled:.2f}x", fmt(compile_s)]


def measure_compile(ctx: Context) -> str:
    rows = [compile_row(ctx, norm) for norm in ctx.profile.cuda_norms]
    head = ["norm", "eager ms", "compiled ms", "speed-up", "compile s (first step)"]
    return "### torch.compile on/off (model only; loss and optimizer step eager)\n\n" + table(head, rows)


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
        "what `trainer.channels_last=auto` decides from (`use_channels_last` in training/loop.py).\n\n"
        + table(head, rows)
    )


def measure_device_cache(ctx: Context) -> str:
    """Epochs of Run._loop with the cached volumes in host memory (a pinned batch copied every step) against
    volumes kept on the GPU and cut there (data.cache_on_device=true), alternating."""
    p = ctx.profile
    runs = {where: prepare(ctx, [f"data.cache_on_device={where}"]).run for where in ("false", "true")}
    bs = int(runs["false"].cfg.data.batch_size)
    steps = math.ceil(len(runs["false"].data.train) / bs)
    times: dict[str, list[float]] = {"false": [], "true": []}
    waits: dict[str, list[float]] = {"false": [], "true": []}
    for run in runs.values():
        our_epoch(run, min(steps, max(1, p.warmup)))  # warm-up: allocator, cudnn.benchmark
    ctx.log(f"cuda: cached volumes on the host vs on the device, {p.epochs} epochs each")
    for _ in range(p.epochs):
        for where, run in runs.items():
            seconds, state = timed(lambda run=run: our_epoch(run, steps), sync_fn(run.device))
            times[where].append(seconds)
            waits[where].append(state.data_wait_seconds / max(state.train_seconds, 1e-9))
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
    speed = median(times["false"]) / median(times["true"])
    head = ["cached volumes in", "s/epoch (median)", "ms/step", "data wait / step", "ms to draw one batch"]
    return "\n".join(
        [
            "### Cached volumes on the device (data.cache_on_device) vs in host memory",
            "",
            f"{steps} steps per epoch, {p.epochs} epoch(s) each, alternating; the real Run._loop with its "
            "prefetch thread.",
            "",
            table(head, rows),
            "",
            f"Epoch speed-up from keeping the volumes on the device: {speed:.2f}x.",
        ]
    )


def measure_cuda(ctx: Context, device: torch.device) -> str:
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


# ------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark the training step, the data pipeline and every norm; writes markdown tables.",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_true",
        help="a subset (4 norms at batch 1, 2, 4 on 16^3 patches); 1-2 minutes on an idle 2-core CPU",
    )
    size.add_argument(
        "--smoke",
        action="store_true",
        help="the smoke config, 1-2 steps per measurement: checks that everything runs (seconds)",
    )
    parser.add_argument(
        "--out",
        default=str(DEFAULT_OUT),
        help="markdown file to write (default: docs/benchmark_results.md); '-' prints only",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: cuda when available (default)",
    )
    parser.add_argument(
        "--only", action="append", choices=SECTIONS, help="run only these sections (repeatable); default: all"
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
        type=int,
        default=None,
        metavar="N",
        help="timed blocks per measurement (default: the profile's); more: steadier medians when busy",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch.set_num_threads(N) first (default: leave torch's default, as training does)",
    )
    parser.add_argument(
        "--cuda-sections-anyway",
        action="store_true",
        help="run section d on a CPU too (tests the code; its numbers mean nothing for GPUs)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmark: --device cuda, but no CUDA device is available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    profile = PROFILES["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.repeats:
        profile = dataclasses.replace(profile, repeats=args.repeats)
    sections = args.only or list(SECTIONS)
    started = time.perf_counter()
    command = " ".join(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="norm-exp-bench-") as workdir:
        ctx = Context(
            profile,
            args.device,
            tuple(args.override),
            Path(workdir),
            args.cuda_sections_anyway,
            bool(args.threads),
        )
        device = Run(compose_cfg(ctx), ctx.workdir).device
        header = machine_header(ctx, device)
        ctx.log(f"profile {profile.name} on {device.type}; sections: {', '.join(sections)}")
        parts = []
        if "overhead" in sections:
            parts.append(measure_overhead(ctx))
        if "epoch" in sections:
            parts.append(measure_epoch(ctx))
            parts += [measure_epoch(ctx, shape) for shape in profile.epoch_volume_shapes]
        if "norms" in sections:
            parts.append(measure_norms(ctx))
        if "cuda" in sections:
            parts.append(measure_cuda(ctx, device))
    summary = table(["measurement", "value", "target", "verdict"], [list(s) for s in ctx.summary])
    report = (
        "\n\n".join(
            [
                "# Benchmark results",
                f"Written by `python scripts/benchmark.py {command}` "
                f"in {time.perf_counter() - started:.0f} s. What each number means: docs/benchmarks.md.",
                "## Machine\n\n" + header,
                "## Targets\n\n" + summary,
                *parts,
            ]
        )
        + "\n"
    )
    print(report)
    if args.out != "-":
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        ctx.log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
