"""What every section shares: the profile and context, building runs through the public training API, timing
with paired blocks and the interval of a ratio, peak memory, and markdown tables."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from monai.losses import DiceCELoss
from omegaconf import DictConfig, OmegaConf, open_dict
from scipy import stats

from norm_experiments.config import CONFIG_DIR, register_resolvers
from norm_experiments.data.pipeline import load_data
from norm_experiments.models import build_model
from norm_experiments.norms import registry
from norm_experiments.training.build import Built, build, make_optimizer, make_plan
from norm_experiments.training.loop import Run
from norm_experiments.training.outputs import peak_rss_mb, reset_peak_rss

# Every registered norm that runs in one process (syncbatch needs several): the registry is the only list.
ALL_NORMS = tuple(name for name, record in registry.records().items() if not record.syncs_ranks)


@dataclass(frozen=True)
class Profile:
    """How much to measure: --smoke (seconds), --quick (minutes on a 2-core CPU) or the full run."""

    name: str
    overrides: tuple[str, ...]  # Hydra overrides applied to every measurement
    warmup: int  # untimed steps before timing
    steps: int  # timed steps per block
    repeats: int  # timed rounds of blocks where a section times a fixed number
    epochs: int  # timed epochs per pipeline in (b)
    overhead_norms: tuple[str, ...]
    norms: tuple[str, ...]  # (c)
    batch_sizes: tuple[int, ...]  # (c)
    norm_patch: tuple[int, ...] | None  # patch of (c); None: the config's
    cuda_norms: tuple[str, ...]  # (d): compile
    amp_batch_sizes: tuple[int, ...]  # (d): AMP vs fp32
    amp_patches: tuple[tuple[int, ...] | None, ...]  # (d): None = the config's patch
    epoch_volume_shapes: tuple[tuple[int, ...], ...] = ()  # (b) again on synthetic volumes of these shapes
    batch1_norms: tuple[str, ...] = ("batch",)  # (e)
    batch1_models: tuple[tuple[str, ...], ...] = ((),)  # (e): overrides per model; () = the config's
    overhead_min_rounds: int = 5  # (a): paired rounds before the interval may stop the measurement
    overhead_cap_s: float = 120.0  # (a): stop adding rounds after this long, however wide the interval
    gpu_runs_per_gpu: tuple[int, ...] = (1, 2, 4)  # (f): k
    gpu_sweep_runs: int = 4  # (f): runs of each sweep (the same runs for every k)
    gpu_sweep: tuple[str, ...] = ()  # (f): overrides of each run (the sweep's seeds are added)


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


# ------------------------------------------------------------------------------------- building runs


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


def load_data_once(data_cfg: DictConfig):
    """load_data, cached per data config: the cached volumes do not depend on the batch size, and
    rebuilding them for every (norm, batch size) would cost more than the measurement itself."""
    plain = OmegaConf.to_container(data_cfg, resolve=True)
    for key in ("batch_size", "patches_per_volume", "foreground_fraction", "augment"):
        plain.pop(key, None)
    key = repr(sorted(plain.items()))
    if key not in _VOLUMES:
        _VOLUMES[key] = load_data(data_cfg)
    return _VOLUMES[key]


def forget_volumes() -> None:
    """Drop the cached volumes, so that the next build times the cache build too."""
    _VOLUMES.clear()


def build_run(ctx: Context, overrides: list[str] | tuple[str, ...] = ()) -> Built:
    """Everything a run of this config trains with (training/build.py), the volumes loaded once per data config."""
    cfg = compose_cfg(ctx, overrides)
    return build(cfg, make_plan(cfg), data=load_data_once(cfg.data))


def runner(built: Built, steps: int | None = None) -> Run:
    """A training Run around built parts, writing nothing: its train_step and loop are what training runs.
    With `steps`, a run of that many steps without validation or checkpoints."""
    plan = built.plan
    if steps is not None:
        plan = dataclasses.replace(plan, total_steps=steps, val_steps=frozenset(), ckpt_every=10**9)
    run = Run(built.cfg, plan, Path("unused"))
    run.built = built
    return run


@dataclass
class Prepared:
    """Built parts of a run, its training Run, and one real training batch (sampler step 0) on its device."""

    run: Built
    trainer: Run
    images: torch.Tensor
    labels: torch.Tensor

    def step(self) -> Callable[[], object]:
        return lambda: self.trainer.train_step(self.images, self.labels)

    @property
    def sync(self) -> Callable[[], None]:
        return sync_fn(self.run.device)


def prepare(ctx: Context, overrides: list[str] | tuple[str, ...] = ()) -> Prepared:
    run = build_run(ctx, overrides)
    images, labels = run.sampler.batch(0)
    images = images.to(run.device, memory_format=run.memory_format)  # as Run.loop moves it
    labels = labels.to(run.device)
    return Prepared(run, runner(run), images, labels)


def twin_model(run: Built, same_layout: bool = True) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The Run's model built again the same way, with the same initial weights, and the same optimizer;
    in the Run's memory format (trainer.channels_last), or the plain one a tutorial would use."""
    model = build_model(run.cfg.model, run.plan.spec, run.data.info.num_channels, run.num_classes).to(
        run.device
    )
    model.load_state_dict(run.model.state_dict())
    if same_layout:
        model.to(memory_format=run.memory_format)
    return model, make_optimizer(run.cfg.optim, model, run.lr)


def loss_function() -> torch.nn.Module:
    """The loss every pipeline trains with (the one training/build.py builds)."""
    return DiceCELoss(to_onehot_y=True, softmax=True)


def describe_cfg(cfg: DictConfig) -> str:
    m = cfg.model
    model = f"{m.name} depth {m.depth} base {m.base_channels}" if m.name == "unet" else str(m.name)
    patch = "x".join(map(str, cfg.data.patch_size))
    return (
        f"model {model}, patch {patch}, batch {cfg.data.batch_size} x {cfg.data.patches_per_volume} "
        f"patch(es), norm {cfg.norm.name}, optimizer {cfg.optim.name}"
    )


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ------------------------------------------------------------------------------------------- timing


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


def timed(fn: Callable[[], object], sync: Callable[[], None]) -> tuple[float, object]:
    """(wall seconds, result) of one call, device work included."""
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - start, result


Times = dict[str, list[float]]


def paired_rounds(
    fns: dict[str, Callable[[], float]],
    rounds: int,
    until: Callable[[Times], bool] | None = None,
    cap_s: float = math.inf,
    max_rounds: int = 10_000,
) -> Times:
    """Rounds of one measurement of every fn (each returns its seconds). The order reverses every round
    (A B, B A, A B ...), so that a drift of the machine's load hits every fn alike instead of favouring the
    one measured first. At least `rounds` rounds; with `until`, more until it says enough, `cap_s` seconds
    have passed or `max_rounds` were taken."""
    times: Times = {name: [] for name in fns}
    order = list(fns)
    start = time.perf_counter()
    done = 0
    while True:
        for name in order if done % 2 == 0 else order[::-1]:
            times[name].append(fns[name]())
        done += 1
        if done < rounds:
            continue
        if until is None or until(times) or done >= max_rounds or time.perf_counter() - start > cap_s:
            return times


def timeit(
    fns: dict[str, Callable[[], object]],
    warmup: int,
    steps: int,
    repeats: int,
    sync: Callable[[], None],
    until: Callable[[Times], bool] | None = None,
    cap_s: float = math.inf,
) -> Times:
    """Per-step seconds of each block of `steps` calls of every fn, after `warmup` untimed calls each;
    blocks in paired rounds (see paired_rounds)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    blocks = {name: (lambda fn=fn: timed_block(fn, steps, sync)) for name, fn in fns.items()}
    return paired_rounds(blocks, repeats, until, cap_s)


def median(values: list[float]) -> float:
    return statistics.median(values)


@dataclass(frozen=True)
class Ratio:
    """A ratio of two timings from paired measurements: the geometric mean of the per-round ratios and its
    95 % confidence interval (Student's t on the logarithms of the per-round ratios)."""

    value: float
    low: float
    high: float
    rounds: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def text(self, digits: int = 3, unit: str = "") -> str:
        if math.isnan(self.low):
            return f"{self.value:.{digits}f}{unit} (no interval from {self.rounds} round)"
        return f"{self.value:.{digits}f}{unit} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def paired_ratio(numerator: list[float], denominator: list[float]) -> Ratio:
    """numerator / denominator, round by round (the two were measured side by side in each round)."""
    logs = [math.log(a / b) for a, b in zip(numerator, denominator, strict=True)]
    center = statistics.fmean(logs)
    if len(logs) < 2:
        return Ratio(math.exp(center), math.nan, math.nan, len(logs))
    spread = float(stats.t.ppf(0.975, len(logs) - 1)) * statistics.stdev(logs) / math.sqrt(len(logs))
    return Ratio(math.exp(center), math.exp(center - spread), math.exp(center + spread), len(logs))


def interval_verdict(ratio: Ratio, target: float, at_most: bool) -> str:
    """met / MISSED when the whole interval is on one side of the target, else undecided (one round gives no
    interval: undecided too, whatever its value)."""
    if math.isnan(ratio.low):
        return "undecided (one round: no interval)"
    good, bad = (
        (ratio.high <= target, ratio.low > target) if at_most else (ratio.low >= target, ratio.high < target)
    )
    return "met" if good else "MISSED" if bad else "undecided (the interval spans the target)"


# ------------------------------------------------------------------------------------------- memory


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


# ------------------------------------------------------------------------------------------- tables


def fmt(value: float | None, digits: int = 1) -> str:
    return (
        "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"
    )


def table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"
