"""The body of `norm-exp-explain` (norm_experiments/explain.py is the command): why BatchNorm trains at batch
size 1 and whether that is fine, measured on the user's config and data or on a trained run. See explain.py."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from norm_experiments.config import register_resolvers
from norm_experiments.data.pipeline import BatchSampler
from norm_experiments.diagnose import trained
from norm_experiments.diagnose.network import weight_problems
from norm_experiments.diagnose.patch_content import (
    ContentRow,
    content_rows,
    measure,
    training_patches,
    validation_windows,
)
from norm_experiments.diagnose.probe import (
    Shape,
    Stats,
    batch_stats,
    bn_layers,
    forward_until,
    gap,
    gap_table,
    layer_shapes,
    pre_hooks,
    table,
)
from norm_experiments.errors import UserError, exit_on_user_error
from norm_experiments.norms import bn_eval_mode
from norm_experiments.norms.batch import RECORD as BATCHNORM  # the norm this command explains
from norm_experiments.training import checkpoint as ckpt
from norm_experiments.training.build import Built, build, make_plan
from norm_experiments.training.run_folder import changed_from_run

register_resolvers()

RUNNING_BATCHES = 20  # batches averaged into the running statistics (table 2)
SPREAD_BATCHES = 16  # batches drawn per batch size (table 3)
SPREAD_BATCH_SIZES = (1, 2, 4, 8)  # the batch sizes the project studies
NOISY = 0.2  # a batch-mean spread or train/eval gap (in σ) above which running averages misfit volumes


@dataclass
class Findings:
    shapes: dict[str, Shape]  # BN layer -> its input shape at the configured batch, in forward order
    n1: int  # N at batch_size=1: patches_per_volume
    gaps: dict[str, dict[str, float]]  # table 2: layer -> batch vs running statistics
    spreads: dict[int, dict[str, tuple[float, float]]]  # table 3: batch size -> layer -> (mean, var) spread
    num_train: int
    content: list[ContentRow] = field(default_factory=list)  # table 4: by foreground share, at batch size 1

    @property
    def first(self) -> str:
        return next(iter(self.shapes))

    @property
    def bottleneck(self) -> str:  # the first layer at the smallest spatial size
        return min(self.shapes, key=lambda name: math.prod(self.shapes[name][2:]))


# ------------------------------------------------------------------------------------------ measuring


def force_batchnorm(cfg: DictConfig) -> str:
    """Make the config's norm BatchNorm with a cumulative running average; return the norm asked for.

    momentum=None makes the running statistics the plain average over all batches seen (PyTorch's rule), so
    after table 2's batches they are the population average, not a recency-weighted one.
    """
    asked = str(cfg.norm.name)
    eps = float(OmegaConf.select(cfg, "norm.options.eps", default=1e-5))
    with open_dict(cfg):
        cfg.norm = OmegaConf.create({"name": BATCHNORM.name, "options": {"eps": eps, "momentum": None}})
    return asked


@torch.no_grad()
def collect(run: Built, sampler: BatchSampler, names: list[str], steps: range) -> dict[str, list[Stats]]:
    """Batch statistics of the named layers (in forward order) over the sampler's batches of these steps,
    normalizing with batch statistics as training does, but leaving the running statistics untouched."""
    records: dict[str, list[Stats]] = {name: [] for name in names}
    last = bn_layers(run.model)[names[-1]]
    with pre_hooks(run.model, names, lambda n, x: records[n].append(batch_stats(x))):
        with bn_eval_mode(run.model, "batch"):
            for step in steps:
                forward_until(run.model, sampler.batch(step)[0].to(run.device), last)
    return records


@torch.no_grad()
def running_gaps(run: Built, names: list[str]) -> dict[str, dict[str, float]]:
    """Train mode over RUNNING_BATCHES batches, then one more batch's statistics against the running ones."""
    layers = bn_layers(run.model)
    run.model.train()
    for step in range(RUNNING_BATCHES):  # running stats after names[-1] are not shown: stop there
        forward_until(run.model, run.sampler.batch(step)[0].to(run.device), layers[names[-1]])
    batch = collect(run, run.sampler, names, range(RUNNING_BATCHES, RUNNING_BATCHES + 1))
    return {name: gap(batch[name][0], layers[name]) for name in names}


def spread(batches: list[Stats]) -> tuple[float, float]:
    """(sd of μ_B / σ, sd of σ²_B / σ²) across batches, averaged over channels.

    σ² is the pooled variance of everything the batches saw (law of total variance): deeper layers' inputs
    depend on the batch size through the BN layers before them, so each batch size gets its own population.
    """
    means = torch.stack([m for m, _ in batches])
    variances = torch.stack([v for _, v in batches])
    pooled_var = variances.mean(0) + means.var(0, correction=0) + 1e-12
    return (means.std(0) / pooled_var.sqrt()).mean().item(), (variances.std(0) / pooled_var).mean().item()


def batch_size_spread(
    run: Built, names: list[str], skip: set[int]
) -> dict[int, dict[str, tuple[float, float]]]:
    """For each batch size b not in `skip`: the spread of the named layers' batch statistics over
    SPREAD_BATCHES batches of b volumes, drawn as training at that batch size would draw them."""
    result = {}
    for b in (b for b in SPREAD_BATCH_SIZES if b not in skip):
        sampler = BatchSampler(
            run.data.train, OmegaConf.merge(run.cfg.data, {"batch_size": b}), int(run.cfg.seed)
        )
        records = collect(run, sampler, names, range(SPREAD_BATCHES))
        result[b] = {name: spread(records[name]) for name in names}
    return result


def values(shape: Shape, n: int | None = None) -> int:
    """Values per channel BatchNorm reduces over: N×D×H×W (N replaced by n if given)."""
    return (shape[0] if n is None else n) * math.prod(shape[2:])


def analyze(run: Built) -> Findings:
    """All the numbers, from a built run whose config has BatchNorm (see force_batchnorm)."""
    n1 = int(run.cfg.data.patches_per_volume)
    shapes = layer_shapes(run.model, run.sampler.batch(0)[0].to(run.device))
    # Table 2 shows the first layer of each resolution, in forward order, down to the bottleneck.
    levels: dict[Shape, str] = {}
    for name, shape in shapes.items():
        levels.setdefault(shape[2:], name)
    gaps = running_gaps(run, list(levels.values()))
    found = Findings(shapes, n1, gaps, {}, len(run.data.train))
    skip = {b for b in SPREAD_BATCH_SIZES if min(values(s, b * n1) for s in shapes.values()) == 1}
    found.spreads = batch_size_spread(run, [found.first, found.bottleneck], skip)
    if 1 not in skip:
        found.content = content_at_batch_1(run, found.first)
    return found


def content_at_batch_1(run: Built, name: str) -> list[ContentRow]:
    """Table 4: training patches at batch size 1 and validation windows, by foreground share, at layer `name`."""
    layer, cfg = bn_layers(run.model)[name], run.cfg
    with bn_eval_mode(run.model, "batch"):
        train = measure(
            run.model, layer, run.device, training_patches(run.data.train, cfg.data, int(cfg.seed))
        )
        windows = validation_windows(run.data.val, list(cfg.data.patch_size), float(cfg.trainer.sw_overlap))
        val = measure(run.model, layer, run.device, windows)
    return content_rows(train, val)


# ------------------------------------------------------------------------------------------ printing


def shape_table(f: Findings) -> str:
    def at_1(s: Shape) -> str:
        return f"{values(s, f.n1):,}" + ("  <- 1 value: error" if values(s, f.n1) == 1 else "")

    rows = [[name, str(s), f"{values(s):,}", at_1(s)] for name, s in f.shapes.items()]
    return table(
        "1. Values each channel's statistics are computed over (BatchNorm reduces over N, D, H, W)",
        ["BN layer", "input (N, C, D, H, W)", "N×D×H×W", f"at batch_size=1 (N={f.n1})"],
        rows,
        "at N=1 still D×H×W values, so the variance is not zero; only N×D×H×W = 1 fails (PyTorch raises)",
    )


def spread_table(f: Findings) -> str:
    rows = []
    for b in SPREAD_BATCH_SIZES:  # a skipped batch size would make some layer see one value per channel
        spreads = (
            [x for name in (f.first, f.bottleneck) for x in f.spreads[b][name]] if b in f.spreads else []
        )
        rows.append([str(b), *([f"{x:.2f}" for x in spreads] or ["error"] * 4), f"{1 / math.sqrt(b):.2f}"])
    kinds = [
        f"{layer} sd({stat})/{scale}"
        for layer in ("first", "bottleneck")
        for stat, scale in (("μ_B", "σ"), ("σ²_B", "σ²"))
    ]
    return table(
        f"3. Spread of batch statistics between {SPREAD_BATCHES} batches, by batch size (volumes per batch)",
        ["batch_size", *kinds, "1/√b"],
        rows,
        f"first = {f.first}, bottleneck = {f.bottleneck}; σ² pooled over the batches; averaged over channels",
    )


def content_table(f: Findings) -> str:
    def number(x: float | None, unit: str = "") -> str:
        return "-" if x is None else f"{x:.2f}{unit}"

    rows = [
        [r.label, f"{r.train_share:.0%}", f"{r.val_share:.0%}", number(r.train_mean_gap, "σ"),
         number(r.val_mean_gap, "σ"), number(r.val_var_gap)]
        for r in f.content
    ]  # fmt: skip
    return table(
        f"4. What a patch holds and how far its statistics lie from the running averages, at batch size 1 "
        f"({f.first})",
        ["foreground share", "training patches", "validation windows", "train |μ_p−μ|/σ", "val |μ_p−μ|/σ",
         "val |σ²_p−σ²|/σ²"],
        rows,
        "μ, σ²: pooled over the training patches (what running statistics converge to); gaps per channel, "
        "then averaged over channels and over the patches of the row",
    )  # fmt: skip


def content_sentence(f: Findings) -> str | None:
    """What table 4 shows, from its numbers: the groups farthest from and closest to the running averages."""
    rows = [r for r in f.content[:-1] if r.val_mean_gap is not None]
    if len(rows) < 2:
        return None
    far, near = max(rows, key=lambda r: r.val_mean_gap), min(rows, key=lambda r: r.val_mean_gap)
    return (
        f"By content: validation windows with {far.label} foreground lie {far.val_mean_gap:.2f}σ from the running "
        f"mean, those with {near.label} {near.val_mean_gap:.2f}σ; {far.label} foreground makes up "
        f"{far.val_share:.0%} of the validation windows and {far.train_share:.0%} of the training patches."
    )


def conclusion(f: Findings, command: str) -> list[str]:
    """A few sentences whose claims follow from the numbers above."""
    single = [name for name, shape in f.shapes.items() if values(shape, f.n1) == 1]
    if single:
        lines = [
            f"At batch size 1, {single[0]} sees ONE value per channel: BatchNorm fails there ('Expected "
            "more than 1 value per channel'); a larger patch or a shallower model avoids it."
        ]
    else:
        lines = [
            f"At batch size 1 each channel's statistics are taken over {values(f.shapes[f.first], f.n1):,} "
            f"values at the first layer and {values(f.shapes[f.bottleneck], f.n1):,} at the bottleneck: the "
            "variance is not zero and nothing divides by zero (eps is not what prevents it)."
        ]
    worst = max(f.gaps, key=lambda name: f.gaps[name]["mean_gap"])
    gap = f.gaps[worst]
    lines.append(
        f"With your batch of {f.shapes[f.first][0]}, one batch's mean is {gap['mean_gap']:.2f}σ from the "
        f"running mean at {worst} and its variance {gap['var_gap']:.0%} off."
    )
    noisy = gap["mean_gap"] > NOISY
    if 1 in f.spreads and 8 in f.spreads:
        s1, s8 = f.spreads[1][f.first][0], f.spreads[8][f.first][0]
        few = f"; only {f.num_train} training cases, so a batch of 8 repeats them" if f.num_train <= 8 else ""
        lines.append(
            f"The first layer's batch mean varies by {s1:.2f}σ between batches at batch size 1 and "
            f"{s8:.2f}σ at 8 (1/√8 of {s1:.2f} is {s1 / math.sqrt(8):.2f}{few})."
        )
        noisy = noisy or s1 > NOISY
    if content_sentence(f):
        lines.append(content_sentence(f))
    if noisy:
        lines.append(
            "So the running averages model.eval() uses describe no single volume: expect eval-mode Dice "
            "to drop. Use norm=group or norm=instance, recompute the statistics after training "
            "(PreciseBN), or evaluate with batch statistics."
        )
    else:
        lines.append(
            f"Both stay under {NOISY}σ: your volumes' statistics are alike, so the running averages fit "
            "them and eval mode should stay close to training."
        )
    lines.append(f"Check it on real training: `{command}`, then compare eval_modes in metrics.json.")
    return lines


def train_command() -> str:
    """The norm-exp-train command that checks the verdict: the user's overrides at BatchNorm, batch size 1."""
    skip = ("norm", "data.batch_size=", "hydra", "+hydra")
    hydra_cfg = HydraConfig.get()
    keep = [o for o in hydra_cfg.overrides.task if not o.startswith(skip)]
    # A sweep preset (experiment=norm_sweep_quick) would start its sweep, which refuses a single cell.
    sweeps = hydra_cfg.runtime.choices.get("hydra/sweeper") == "study" or bool(
        hydra_cfg.sweeper.get("params")
    )
    return " ".join(
        ["norm-exp-train", "norm=batch", "data.batch_size=1", *keep, *(["hydra.mode=RUN"] if sweeps else [])]
    )


# ------------------------------------------------------------------------------------------ entry point


def explain_trained(cfg: DictConfig, run_dir: Path) -> None:
    """The trained network of a finished run, window by window (diagnose/trained.py)."""
    # Said before the data loads; a FIFO or a link in its place gets the weights loader's own line.
    if not (run_dir / ckpt.FINAL_WEIGHTS).exists():
        raise UserError(
            f"trained={run_dir}: the run has no {ckpt.FINAL_WEIGHTS} (it is written when the run completes); "
            "this measures a finished run's network"
        )
    changed = changed_from_run(run_dir, cfg)
    norm_changed = [line for line in changed if line.startswith(("norm.", "model."))]
    if norm_changed:  # the weights are the run's network's: another norm or model cannot hold them
        raise UserError(
            f"trained={run_dir}: {norm_changed[0]} given here; trained= measures the run's own network: leave "
            "norm= and model= out"
        )
    run = build(cfg, make_plan(cfg))
    if not run.plan.spec.bn_family:
        raise UserError(
            f"trained={run_dir}: its norm is {run.plan.spec.name}; this measures running statistics, which only "
            "the BatchNorm family keeps"
        )
    weights = ckpt.load_weights(run_dir / ckpt.FINAL_WEIGHTS)
    problems = weight_problems(run.model.state_dict(), weights)
    if problems:
        raise UserError(f"{run_dir / ckpt.FINAL_WEIGHTS}: does not fit the run's own network: {problems[0]}")
    run.model.load_state_dict(weights)
    window = tuple(int(v) for v in cfg.data.patch_size)
    print(
        f"Explaining the trained network of {run_dir} ({run.plan.spec.name}, batch size {cfg.data.batch_size}, "
        f"seed {cfg.seed}) on {len(run.data.val)} validation volumes, in windows of {list(window)}."
    )
    if changed:
        print(
            f"Not the run's own (its run_config.yaml says otherwise: given here, or a default since changed): {'; '.join(changed)}."
        )
    found = trained.measure(run.model, run.data.val, window, run.num_classes)
    print("\n" + trained.layer_table(found))
    print("\n" + trained.content_table(found))
    print("\n" + "\n".join(trained.conclusion(found)))


@exit_on_user_error
def explain(cfg: DictConfig) -> None:
    if cfg.get("trained"):
        run_dir = Path(str(cfg.trained))
        with open_dict(cfg):
            del cfg["trained"]
        explain_trained(cfg, run_dir)
        return
    with open_dict(cfg):
        cfg.pop("trained", None)
    asked = force_batchnorm(cfg)
    run = build(cfg, make_plan(cfg))  # validates the config and the feature-map sizes; writes nothing
    print(
        f"Explaining BatchNorm on {len(run.data.train)} training cases, patch {list(cfg.data.patch_size)}, "
        f"batch_size {cfg.data.batch_size} × patches_per_volume {cfg.data.patches_per_volume} = "
        f"N {run.plan.effective_batch}; freshly initialised model, nothing trained."
    )
    if asked != BATCHNORM.name:
        print(f"norm={asked} ignored: this analysis always uses BatchNorm (it explains BatchNorm).")
    found = analyze(run)
    gaps_title = (
        f"2. One training batch (N={found.shapes[found.first][0]}) vs the running averages of "
        f"{RUNNING_BATCHES} batches, which model.eval() uses"
    )
    parts = [shape_table(found), gap_table(found.gaps, gaps_title), spread_table(found)]
    for part in parts + ([content_table(found)] if found.content else []):
        print("\n" + part)
    print("\n" + "\n".join(conclusion(found, train_command())))
