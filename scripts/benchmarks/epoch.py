"""b. One epoch of our pipeline (the real Run.loop) against MONAI's pipelines as users run them: (i) the
MONAI 3D tutorial as written (CacheDataset with cache_rate 1.0, DataLoader with workers), (ii) MONAI's
fast-training recipe (CacheDataset + ThreadDataLoader, the cached volumes moved to the device once), and an
uncached Dataset (labelled as such: no tutorial runs that way, it bounds what caching buys)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import monai
import torch
from monai.data import CacheDataset, DataLoader, Dataset, ThreadDataLoader
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    FgBgToIndicesd,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    SpatialPadd,
)
from omegaconf import DictConfig

from benchmarks.common import (
    Context,
    Prepared,
    Ratio,
    describe_cfg,
    fmt,
    forget_volumes,
    interval_verdict,
    loss_function,
    median,
    paired_ratio,
    paired_rounds,
    prepare,
    runner,
    table,
    timed,
    twin_model,
    usable_cores,
)
from norm_experiments.data.layouts import find_cases, split_cases
from norm_experiments.data.pipeline import dataset_root
from norm_experiments.norms import BNStatMonitor
from norm_experiments.training.build import Built
from norm_experiments.training.loop import State
from norm_experiments.training.prefetch import InlineExecutor, batch_executor, prefetch_pool
from norm_experiments.training.progress import Progress

# Speed-up targets of ours against each baseline (baseline epoch / our epoch), per device type. The issue
# sets (i) and (ii) >= 1.0x on a CPU and (i) >= 2x on a GPU; (ii) keeps 1.0x on a GPU (none was set there).
TARGETS = {"cpu": {"tutorial": 1.0, "recipe": 1.0}, "cuda": {"tutorial": 2.0, "recipe": 1.0}}
DATA_WAIT_TARGET = 0.05
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # as the pipeline (silences MONAI's deprecation warning)
# Section b is repeated on larger synthetic volumes (still about 1/7 of a 512x512x90 CT): reading and
# cropping a volume costs more with its size, a training patch does not. Cases of that size: 6 train, 2 val.
LARGE_VOLUME_CASES = 8
TUTORIAL_WORKERS = 4  # the tutorial's DataLoader(num_workers=4) and CacheDataset(num_workers=4)


def loader_workers() -> int:
    """The tutorial's 4 workers, capped by the cores this process may use (2 on the 2-core CI machine)."""
    return max(1, min(TUTORIAL_WORKERS, usable_cores()))


# ------------------------------------------------------------------------------------ the baselines


def training_files(cfg: DictConfig) -> list[dict]:
    """The run's training cases as MONAI data dicts (the same split as ours)."""
    layout, root = dataset_root(cfg.data)
    cases, _ = find_cases(layout, root)
    val_cases = list(cfg.data.val_cases) if cfg.data.val_cases else None
    train_cases, _ = split_cases(cases, cfg.data.val_fraction, cfg.data.split_seed, val_cases)
    return [{"image": [str(p) for p in c.images], "label": str(c.label)} for c in train_cases]


def preprocessing(cfg: DictConfig) -> list:
    """The deterministic transforms (what a CacheDataset caches): the run's own preprocessing. The
    tutorial's CT-specific ScaleIntensityRanged, Spacingd and CropForegroundd become the config's."""
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
    return steps


def augmentation(cfg: DictConfig, precomputed_indices: bool = False) -> list:
    """The random transforms, run every step: the crop and the same flips and rot90 as ours."""
    keys, d = ("image", "label"), cfg.data
    fg = float(d.foreground_fraction)
    indices = {"fg_indices_key": "label_fg", "bg_indices_key": "label_bg"} if precomputed_indices else {}
    return [
        RandCropByPosNegLabeld(
            keys,
            "label",
            list(d.patch_size),
            pos=fg,
            neg=1.0 - fg,
            num_samples=int(d.patches_per_volume),
            **indices,
        ),
        *[RandFlipd(keys, prob=d.augment.flip_prob, spatial_axis=a) for a in range(3)],
        RandRotate90d(keys, prob=d.augment.rot90_prob, spatial_axes=(1, 2)),
    ]


@dataclass
class Baseline:
    """One MONAI pipeline: its loader, how long building it took, and how its loop trains."""

    key: str  # tutorial | recipe | uncached
    label: str
    loader: DataLoader
    build_s: float
    amp: bool = False  # the recipe trains under autocast with a GradScaler on CUDA, as written
    track_meta: bool = True  # the recipe turns MONAI's metadata tracking off for its random transforms


def tutorial(cfg: DictConfig) -> Baseline:
    """(i) The MONAI 3D tutorial as written: CacheDataset(cache_rate=1.0) and DataLoader(shuffle, workers)."""
    workers = loader_workers()
    files = training_files(cfg)
    transform = Compose([*preprocessing(cfg), *augmentation(cfg)])
    seconds, dataset = timed(
        lambda: CacheDataset(files, transform, cache_rate=1.0, num_workers=workers, progress=False),
        lambda: None,
    )
    loader = DataLoader(dataset, batch_size=int(cfg.data.batch_size), shuffle=True, num_workers=workers)
    label = f"(i) MONAI 3D tutorial: CacheDataset(cache_rate=1.0), DataLoader(num_workers={workers})"
    return Baseline("tutorial", label, loader, seconds)


def recipe(cfg: DictConfig, device: torch.device) -> Baseline:
    """(ii) MONAI's fast-training recipe: foreground/background indices precomputed and the volumes moved to
    the device when cached (EnsureTyped(device=..., track_meta=False)), CacheDataset(copy_cache=False),
    ThreadDataLoader(num_workers=0), metadata tracking off, AMP on CUDA."""
    files = training_files(cfg)
    to_device = EnsureTyped(("image", "label"), device=device, track_meta=False)
    indices = FgBgToIndicesd("label", fg_postfix="_fg", bg_postfix="_bg")  # the crop pops label_fg, label_bg
    cached = [*preprocessing(cfg), indices, to_device]
    transform = Compose([*cached, *augmentation(cfg, precomputed_indices=True)])
    seconds, dataset = timed(
        lambda: CacheDataset(
            files, transform, cache_rate=1.0, num_workers=loader_workers(), copy_cache=False, progress=False
        ),
        lambda: None,
    )
    loader = ThreadDataLoader(dataset, num_workers=0, batch_size=int(cfg.data.batch_size), shuffle=True)
    label = "(ii) MONAI fast-training recipe: CacheDataset on the device, ThreadDataLoader"
    return Baseline("recipe", label, loader, seconds, amp=device.type == "cuda", track_meta=False)


def uncached(cfg: DictConfig) -> Baseline:
    """Every transform, the NIfTI read included, on every step: Dataset without a cache, DataLoader(0)."""
    dataset = Dataset(training_files(cfg), Compose([*preprocessing(cfg), *augmentation(cfg)]))
    loader = DataLoader(dataset, batch_size=int(cfg.data.batch_size), shuffle=True, num_workers=0)
    return Baseline(
        "uncached", "uncached Dataset, DataLoader(num_workers=0) (no tutorial runs so)", loader, 0.0
    )


@contextlib.contextmanager
def metadata_tracking(on: bool):
    before = monai.data.get_track_meta()
    monai.data.set_track_meta(on)
    try:
        yield
    finally:
        monai.data.set_track_meta(before)


def baseline_epoch(
    baseline: Baseline, model, optimizer, device: torch.device, limit: int | None = None
) -> None:
    """The tutorials' training loop over the loader (`loss.item()` every step, as they do); `limit` steps
    only for a warm-up."""
    loss_fn = loss_function()
    scaler = torch.amp.GradScaler("cuda", enabled=baseline.amp)
    autocast = torch.autocast("cuda") if baseline.amp else contextlib.nullcontext()
    epoch_loss, steps = 0.0, 0
    with metadata_tracking(baseline.track_meta):
        for batch in baseline.loader:
            if limit is not None and steps >= limit:
                return
            inputs, labels = batch["image"].to(device), batch["label"].to(device)
            optimizer.zero_grad()
            with autocast:
                loss = loss_fn(model(inputs), labels)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            epoch_loss += loss.item()
            steps += 1
    if limit is None and steps != len(baseline.loader):  # a loader thread that died ends an epoch early
        raise RuntimeError(
            f"{baseline.key}: the loader stopped after {steps} of {len(baseline.loader)} batches"
        )


# ------------------------------------------------------------------------------------------- ours


class _NullWriter:
    def add_scalar(self, *args, **kwargs) -> None:
        pass

    add_image = add_scalar


def our_epoch(built: Built, steps: int, prefetch: bool | None = None) -> State:
    """`steps` steps of the real training loop (Run.loop: BN monitor on logged steps, logging every
    log_every_steps), without validation or checkpoints; returns the loop's State (train and data-wait
    seconds). The next batch is cut where training cuts it (a thread on CUDA, inline on a CPU, see
    training/prefetch.py) unless `prefetch` says True (a thread) or False (inline), to show what the other
    choice would cost."""
    run = runner(built, steps)
    monitor = BNStatMonitor(built.model)
    progress = Progress(steps, 0, "none", "benchmark")
    if prefetch is None:
        executor = batch_executor(built.device)
    else:
        executor = prefetch_pool() if prefetch else InlineExecutor()
    with executor:
        run.loop(_NullWriter(), monitor, progress, SimpleNamespace(requested=False), executor)
    monitor.close()
    return run.state


# ------------------------------------------------------------------------------------------ measure


@dataclass
class Epochs:
    """The measured epochs of every pipeline, side by side, and what each pipeline needed besides."""

    seconds: dict[str, list[float]]
    waits: list[float]  # our data-wait fraction per epoch
    loader_ms: dict[str, float]  # each baseline's loader alone, ms per batch
    steps: dict[str, int]  # steps per epoch


def time_epochs(
    ctx: Context, prep: Prepared, baselines: list[Baseline], threaded: bool, plain: Built | None
) -> Epochs:
    """Rounds of one epoch of every pipeline. `plain`: ours again in PyTorch's default memory format, where
    ours trains channels_last_3d (the MONAI pipelines train the default one)."""
    p = ctx.profile
    run, sync, device = prep.run, prep.sync, prep.run.device
    steps = {"ours": math.ceil(len(run.data.train) / int(run.cfg.data.batch_size))}
    steps["other"] = steps["plain"] = steps["ours"]
    waits: list[float] = []
    fns: dict[str, Callable[[], float]] = {}

    def ours() -> float:
        seconds, state = timed(lambda: our_epoch(run, steps["ours"]), sync)
        waits.append(state.data_wait_seconds / max(state.train_seconds, 1e-9))
        return seconds

    fns["ours"] = ours
    fns["other"] = lambda: timed(lambda: our_epoch(run, steps["ours"], prefetch=not threaded), sync)[0]
    if plain is not None:
        fns["plain"] = lambda: timed(lambda: our_epoch(plain, steps["ours"]), sync)[0]
    loader_ms = {}
    for baseline in baselines:
        model, optimizer = twin_model(run, same_layout=False)  # a tutorial trains the plain layout
        with metadata_tracking(baseline.track_meta):  # the loader alone: read, transforms, collate
            alone, batches = timed(lambda b=baseline: sum(1 for _ in b.loader), sync)
        if batches != len(baseline.loader):
            raise RuntimeError(
                f"{baseline.key}: the loader stopped after {batches} of {len(baseline.loader)} batches"
            )
        loader_ms[baseline.key] = alone / len(baseline.loader) * 1e3
        baseline_epoch(baseline, model, optimizer, device, limit=p.warmup)
        steps[baseline.key] = len(baseline.loader)
        fns[baseline.key] = lambda b=baseline, m=model, o=optimizer: timed(
            lambda: baseline_epoch(b, m, o, device), sync
        )[0]
    for _ in range(p.warmup):
        prep.step()()
    ctx.log(f"epoch: {steps['ours']} steps per epoch, {p.epochs} rounds of {', '.join(fns)}")
    return Epochs(paired_rounds(fns, p.epochs), waits, loader_ms, steps)


def measure_volumes(ctx: Context, device: torch.device, volume_shape: tuple[int, ...] | None = None) -> str:
    """Section b on the config's volumes, or on synthetic volumes of `volume_shape` (8 cases)."""
    overrides: list[str] = []
    if volume_shape is not None:
        shape = ",".join(map(str, volume_shape))
        overrides = [f"data.synthetic.shape=[{shape}]", f"data.synthetic.num_cases={LARGE_VOLUME_CASES}"]
        ctx.log(f"epoch: synthetic volumes of {volume_shape} (generated on first use)")
    forget_volumes()  # time the cache build too: the one-off cost of our pipeline
    build_s, prep = timed(lambda: prepare(ctx, overrides), lambda: None)
    cfg, device = prep.run.cfg, prep.run.device
    ctx.log("epoch: building the MONAI pipelines (CacheDataset caches every training case)")
    baselines = [tutorial(cfg), recipe(cfg, device), uncached(cfg)]
    threaded = device.type == "cuda"  # where Run.batch_executor cuts the next batch
    plain = None
    if prep.run.memory_format == torch.channels_last_3d:  # the same volumes, PyTorch's default layout
        plain = prepare(ctx, [*overrides, "trainer.channels_last=false"]).run
    epochs = time_epochs(ctx, prep, baselines, threaded, plain)
    volumes = "x".join(map(str, prep.run.data.train[0].image.shape[1:]))
    suffix = "" if volume_shape is None else f", volumes {volumes}"
    wait = median(epochs.waits)
    targets = TARGETS["cuda" if device.type == "cuda" else "cpu"]
    speedups: dict[str, Ratio] = {}
    for baseline in baselines:
        speedups[baseline.key] = paired_ratio(epochs.seconds[baseline.key], epochs.seconds["ours"])
        if baseline.key in targets:
            ratio, target = speedups[baseline.key], targets[baseline.key]
            ctx.summary.append(
                (
                    f"epoch speed-up vs {baseline.label.split(':')[0]}{suffix}",
                    ratio.text(2, "x"),
                    f">= {target}x ({device.type})",
                    interval_verdict(ratio, target, at_most=False),
                )
            )
    ok = "met" if wait < DATA_WAIT_TARGET else "MISSED"
    ctx.summary.append((f"data-wait fraction{suffix}", f"{wait:.1%}", f"< {DATA_WAIT_TARGET:.0%}", ok))
    return report(ctx, prep, baselines, epochs, speedups, targets, build_s, suffix, volumes)


def report(
    ctx: Context,
    prep: Prepared,
    baselines: list[Baseline],
    epochs: Epochs,
    speedups: dict[str, Ratio],
    targets: dict[str, float],
    build_s: float,
    suffix: str,
    volumes: str,
) -> str:
    """Section b's table and notes for one set of volumes."""
    p, run = ctx.profile, prep.run
    cfg, device = run.cfg, run.device
    bs, ppv = int(cfg.data.batch_size), int(cfg.data.patches_per_volume)
    threaded = device.type == "cuda"
    wait = median(epochs.waits)

    def row(key: str, label: str, speedup: str, target: str, wait_text: str) -> list[object]:
        seconds, n_steps = epochs.seconds[key], epochs.steps[key]
        return [
            label,
            n_steps * bs * ppv,
            fmt(median(seconds), 2),
            fmt(median(seconds) / n_steps * 1e3),
            speedup,
            target,
            wait_text,
        ]

    ours_label = f"ours: Run.loop, cached volumes, next batch cut {'in a thread' if threaded else 'inline'} (the default on {device.type})"
    other = paired_ratio(epochs.seconds["other"], epochs.seconds["ours"])
    rows = [
        row("ours", ours_label, "1", "", f"{wait:.1%}"),
        row(
            "other",
            f"ours with the next batch cut {'inline' if threaded else 'in a prefetch thread'} instead",
            other.text(2, "x"),
            "",
            "",
        ),
    ]
    if "plain" in epochs.seconds:
        plain = paired_ratio(epochs.seconds["plain"], epochs.seconds["ours"])
        label = "ours in PyTorch's default memory format (trainer.channels_last=false), as the MONAI pipelines train"
        rows.append(row("plain", label, plain.text(2, "x"), "", ""))
    for b in baselines:
        target = targets.get(b.key)
        verdict_text = (
            f">= {target}x: {interval_verdict(speedups[b.key], target, at_most=False)}"
            if target
            else "(reference)"
        )
        rows.append(row(b.key, b.label, f"**{speedups[b.key].text(2, 'x')}**", verdict_text, "n/a"))
    head = [
        "pipeline",
        "patches/epoch",
        "s/epoch (median)",
        "ms/step",
        "its epoch / ours [95 % interval]",
        "target",
        "data wait / step",
    ]
    precision = "bf16 autocast" if run.amp else "fp32"
    recipe_precision = (
        "fp16 autocast with a GradScaler" if device.type == "cuda" else "fp32 (no autocast on a CPU)"
    )
    loaders = ", ".join(f"{b.key} {fmt(epochs.loader_ms[b.key])} ms" for b in baselines)
    builds = ", ".join(f"{b.key} {b.build_s:.1f} s" for b in baselines if b.key != "uncached")
    our_step = median(epochs.seconds["ours"]) / epochs.steps["ours"] * 1e3
    return "\n".join(
        [
            f"## b. One epoch: our pipeline vs MONAI's tutorial and fast-training recipe{suffix}",
            "",
            f"{describe_cfg(cfg)}; volumes {volumes} after preprocessing; {len(run.data.train)} training "
            f"cases; {p.epochs} rounds of one epoch of every pipeline, side by side in an order that reverses "
            "every round. Every pipeline trains the same model (same initial weights), loss, optimizer, patch "
            "and batch size, with the same preprocessing (the config's: orientation, z-score, padding) and "
            "augmentation (pos/neg crop, flips, rot90). Ours runs at "
            f"{precision} in the memory format trainer.channels_last picks; the MONAI pipelines train the plain "
            f"layout with `loss.item()` every step as the tutorials do: (i) and the uncached one in fp32, (ii) "
            f"in {recipe_precision}. Speed-up = their epoch / ours: geometric mean of the per-round ratios "
            "with its 95 % interval; a verdict needs the whole interval on one side of the target.",
            "",
            table(head, rows),
            "",
            f"Data-wait fraction (time blocked on the next batch / step time, from Run.loop's own counters): "
            f"**{wait:.1%}** (target < {DATA_WAIT_TARGET:.0%}). One-off costs: building our Run (caching every "
            f"case, file checks, model) {build_s:.1f} s; CacheDataset builds: {builds}. Each loader alone (no "
            f"training), per batch: {loaders}, against {fmt(our_step)} ms per step of ours.",
        ]
    )


def measure(ctx: Context, device: torch.device) -> str:
    """Section b on the config's volumes, then on each larger volume shape of the profile."""
    parts = [measure_volumes(ctx, device)]
    parts += [measure_volumes(ctx, device, shape) for shape in ctx.profile.epoch_volume_shapes]
    return "\n\n".join(parts)
