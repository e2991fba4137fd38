"""Validation: sliding-window inference on whole volumes, per-class Dice and HD95 (per case and averaged),
BatchNorm's evaluation modes (running statistics, PreciseBN, batch statistics) and the split of the volumes
across ranks. docs/explanation/evaluation_modes.md explains the modes.

What counts, per class c and validation volume v:
- c absent from v's ground truth: v says nothing about c (Dice and HD95 skipped for that pair), whatever
  the prediction holds. A class absent from every validation volume is excluded from the means and
  reported as absent, never as 0.
- c present but not predicted at all: Dice 0, and HD95 = the volume's diagonal in mm (the largest distance
  inside the image; MONAI would return inf, which would make every mean inf).
Per-class values are means over the volumes holding the class; the reported mean is over present classes.
Every volume's own scores are kept too (ValResult.case_totals; metrics.json's per_case).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from monai.inferers import sliding_window_inference
from monai.metrics import compute_dice, compute_hausdorff_distance
from omegaconf import DictConfig
from torch import nn

from norm_experiments.data.pipeline import BatchSampler, DataBundle, Volume
from norm_experiments.norms import bn_eval_mode, recompute_bn_statistics
from norm_experiments.training import distributed
from norm_experiments.training import error_locations as errors
from norm_experiments.training.signals import phase, stop_point, stop_point_all_ranks


class Built(Protocol):
    """What an evaluation needs of a built run: training/build.Built is one (a protocol here, so that the
    evaluation does not import the module that builds runs, which imports it)."""

    cfg: DictConfig
    plan: Any  # build.Plan: the device and the norm
    data: DataBundle
    model: nn.Module
    inference: Inference

    @property
    def num_classes(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def autocast(self) -> contextlib.AbstractContextManager: ...


log = logging.getLogger("norm_experiments.train")

# PreciseBN draws its training patches from a seed stream the training batches never use (seed + this).
PRECISE_BN_SEED_OFFSET = 1_000_003
REMEDY_PRECISE_FACTOR = 4  # trainer.remedy_modes: PreciseBN again over this many times the patches

# Rows of the per-class totals that validation sums over volumes (and over ranks): Dice sum, HD95 sum,
# number of volumes holding the class.
DICE, HD95, PRESENT = 0, 1, 2


def case_dice(totals: torch.Tensor, class_names: Sequence[str]) -> dict[str, float | None]:
    """The package's one per-case Dice: each foreground class's Dice in one case, from that case's totals
    (a row of ValResult.case_totals), None where the class is absent from the case's truth. The record,
    the label maps' index and norm-exp-check's per-case verdicts read it."""
    present = (totals[PRESENT] > 0).tolist()
    return {name: float(totals[DICE, c]) if present[c] else None for c, name in enumerate(class_names)}


def case_mean_dice(totals: torch.Tensor) -> float | None:
    """One case's Dice averaged over the foreground classes it holds (case_dice); None if it holds none."""
    values = [
        v for v in case_dice(totals, [str(c) for c in range(totals.shape[1])]).values() if v is not None
    ]
    return sum(values) / len(values) if values else None


@dataclass
class ValResult:
    """Validation scores; per-class lists are for the foreground classes 1..K, None where a class is absent."""

    dice_mean: float  # mean over present classes (nan if no class is present at all)
    dice_per_class: list[float | None]
    hd95_mean: float | None  # mm; None when surface distances were not computed (intermediate validations)
    hd95_per_class: list[float | None] | None
    absent: list[int]  # foreground classes (1-based) absent from every validation volume
    example: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (image, label, prediction) of a volume
    # Each volume's totals (volume_scores), (volumes, 3, classes), in the order of case_names.
    case_totals: torch.Tensor | None = None
    case_names: list[str] = dataclasses.field(default_factory=list)
    # Final evaluations only: each case's error locations (volumes, len(errors.FIELDS)), and the scores after
    # keeping each class's largest connected component (the running mode's post-processing remedy).
    case_errors: torch.Tensor | None = None
    lcc: ValResult | None = None

    def per_case(self, class_names: Sequence[str]) -> dict[str, dict[str, dict[str, float | None]]]:
        """{case: {"dice": {class: value}, "hd95": {class: value}}}, None where the class is absent from the
        case (and for HD95 when surface distances were not computed)."""
        if self.case_totals is None:
            return {}
        surface = self.hd95_per_class is not None
        cases = {}
        for name, totals in zip(self.case_names, self.case_totals):
            present = (totals[PRESENT] > 0).tolist()
            hd95 = [float(v) if p and surface else None for v, p in zip(totals[HD95], present)]
            cases[name] = {"dice": case_dice(totals, class_names), "hd95": dict(zip(class_names, hd95))}
        if self.case_errors is not None:
            for name, row in zip(self.case_names, self.case_errors):
                cases[name]["errors"] = errors.as_record(row)
        return cases


@dataclass
class Inference:
    """How validation runs inference: window size, windows per forward, overlap, device and autocast."""

    roi_size: list[int]
    sw_batch_size: int
    overlap: float
    device: torch.device
    autocast: Callable[[], object]
    # Windows per forward in BatchNorm's "batch" evaluation mode, where each forward normalizes with its own
    # statistics (trainer.batch_stats_windows): None = sw_batch_size; 1 = every window alone.
    batch_stats_windows: int | None = None

    def for_mode(self, mode: str) -> Inference:
        """The inference of a BatchNorm evaluation mode: only "batch" may batch windows differently."""
        if mode != "batch" or self.batch_stats_windows is None:
            return self
        return dataclasses.replace(self, sw_batch_size=self.batch_stats_windows)


def volume_scores(
    pred: torch.Tensor, label: torch.Tensor, num_classes: int, spacing: Sequence[float] | None
) -> torch.Tensor:
    """Per-class totals (rows DICE, HD95, PRESENT) of one volume from its predicted and true class maps
    (D, H, W). HD95 is computed only when `spacing` (mm per voxel) is given; its row stays 0 otherwise."""
    totals = torch.zeros(3, num_classes - 1, dtype=torch.float64)
    one_hot_pred, one_hot_label = _one_hot(pred, num_classes), _one_hot(label, num_classes)
    present = one_hot_label[0, 1:].flatten(1).any(1).bool()  # uint8 input: any() returns uint8
    if not present.any():
        return totals
    dice = compute_dice(one_hot_pred, one_hot_label, include_background=False, ignore_empty=True)[0]
    totals[DICE] = torch.where(present, dice.double(), 0.0)
    totals[PRESENT] = present.double()
    if spacing is not None:
        totals[HD95] = _hd95(one_hot_pred, one_hot_label, present, spacing)
    return totals


def _hd95(pred: torch.Tensor, label: torch.Tensor, present: torch.Tensor, spacing: Sequence[float]):
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(label.shape[2:], spacing)))
    predicted = pred[0, 1:].flatten(1).any(1).bool()
    with warnings.catch_warnings():  # empty masks are handled below; MONAI warns about each one
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(pred, label, percentile=95, spacing=list(spacing))[0].double()
    hd = torch.where(predicted, hd, diagonal)  # a missed class: the largest distance in the image
    return torch.where(present, hd, 0.0)


def summarize(
    totals: torch.Tensor, surface: bool, example=None, case_totals=None, case_names=None
) -> ValResult:
    """Means over the volumes that hold each class, and over present classes (see the module docstring).
    `totals` may also be the per-volume totals (volumes, 3, classes): they are summed and kept."""
    if totals.dim() == 3:
        case_totals, totals = totals, totals.sum(0)
    count = totals[PRESENT]
    present = count > 0

    def per_class(row: int) -> list[float | None]:
        return [float(s / n) if n > 0 else None for s, n in zip(totals[row], count)]

    def mean(values: list[float | None]) -> float:
        kept = [v for v in values if v is not None]
        return sum(kept) / len(kept) if kept else math.nan

    dice = per_class(DICE)
    hd95 = per_class(HD95) if surface else None
    absent = [c + 1 for c, p in enumerate(present.tolist()) if not p]
    hd95_mean = mean(hd95) if hd95 else None
    return ValResult(mean(dice), dice, hd95_mean, hd95, absent, example, case_totals, list(case_names or []))


@dataclass
class Extras:
    """What a final evaluation adds per volume, filled by score_each_volume: the error locations, and (with
    `lcc`) the per-class totals after keeping each class's largest connected component."""

    volumes: int
    num_classes: int
    lcc: bool = False
    errors: torch.Tensor = dataclasses.field(init=False)
    lcc_totals: torch.Tensor = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.errors = torch.zeros(self.volumes, len(errors.FIELDS), dtype=torch.float64)
        self.lcc_totals = torch.zeros(self.volumes, 3, self.num_classes - 1, dtype=torch.float64)

    def add(self, i: int, vol: Volume, pred: torch.Tensor, label: torch.Tensor, window: list[int]) -> None:
        image = vol.image[0].float().cpu()[vol.own].numpy()
        self.errors[i] = torch.from_numpy(
            errors.case_errors(pred.numpy(), label.numpy(), image, vol.spacing, window)
        )
        if self.lcc:
            kept = errors.largest_components(pred, self.num_classes)
            self.lcc_totals[i] = volume_scores(kept, label, self.num_classes, vol.spacing)


@torch.inference_mode()
def score_each_volume(
    model: nn.Module,
    volumes: list[Volume],
    num_classes: int,
    inf: Inference,
    surface: bool = False,
    extras: Extras | None = None,
) -> tuple[torch.Tensor, tuple | None]:
    """Per-class totals of each of `volumes` (volumes, 3, classes; see volume_scores) and an example slice
    from the first volume; `extras`, when given, gets each volume's error locations (and LCC scores).

    The model is used as it is: the caller chooses train/eval/BN mode. A stop request (SIGTERM during a
    run) is acted on before each volume and each forward of sliding-window inference (signals.stop_point)."""
    totals = torch.zeros(len(volumes), 3, num_classes - 1, dtype=torch.float64)
    example = None
    for i, vol in enumerate(volumes):
        stop_point()
        image = vol.image.unsqueeze(0).to(inf.device, non_blocking=True)  # no copy if cached there already
        with inf.autocast():
            logits = sliding_window_inference(
                image, inf.roi_size, inf.sw_batch_size, stoppable(model), overlap=inf.overlap, mode="gaussian"
            )
        # Scores in host memory: one-hot tensors (classes x volume) could exhaust a GPU's memory.
        own = vol.own  # the case's voxels: padding to the patch is no part of it
        pred = logits.argmax(dim=1)[0].cpu()[own]
        label = vol.label[0].long().cpu()[own]
        totals[i] = volume_scores(pred, label, num_classes, vol.spacing if surface else None)
        if extras is not None:
            extras.add(i, vol, pred, label, inf.roi_size)
        if example is None:
            example = (vol.image[0].cpu()[own], label, pred)
    return totals, example


def stoppable(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`model` as sliding-window inference's predictor, passing a stop point before each forward (a large
    volume is many forwards: seconds on a CPU)."""

    def predict(windows: torch.Tensor) -> torch.Tensor:
        stop_point()
        return model(windows)

    return predict


def score_volumes(
    model: nn.Module, volumes: list[Volume], num_classes: int, inf: Inference, surface: bool = False
) -> tuple[torch.Tensor, tuple | None]:
    """Per-class totals summed over `volumes` (3, classes) and an example slice (see score_each_volume)."""
    totals, example = score_each_volume(model, volumes, num_classes, inf, surface)
    return totals.sum(0), example


def evaluate(
    model: nn.Module, volumes: list[Volume], num_classes: int, inf: Inference, surface: bool = False
) -> ValResult:
    """Dice (and HD95 in mm when `surface`) of `model` on every validation volume."""
    totals, example = score_each_volume(model, volumes, num_classes, inf, surface)
    return summarize(totals, surface, example, case_names=[v.name for v in volumes])


def evaluate_built(
    built: Built,
    model: nn.Module,
    mode: str = "running",
    surface: bool = False,
    lcc: bool = False,
    windows: int | None = None,
) -> ValResult:
    """Dice (and HD95 when `surface`) of a run's `model` on its validation volumes, per case and averaged,
    with BatchNorm layers in `mode` (running | batch, see bn_eval_mode; "batch" forwards
    trainer.batch_stats_windows windows at a time). With `surface` (a final evaluation) each case's error
    locations too, and with `lcc` the scores after keeping each class's largest connected component.
    `windows`: in "batch" mode, this many windows per forward instead of trainer.batch_stats_windows.

    With several ranks, each evaluates every world_size-th volume and writes its volumes' rows of a table of
    every volume, which the ranks then add up: every rank gets every case's scores, the same numbers as one
    process. No forward communicates: sync layers use their rank's batch statistics ("batch" mode normalizes
    each forward with its own statistics, as in one process), so ranks with different numbers of forwards
    never wait.
    """
    every = built.data.val
    with bn_eval_mode(model, mode), distributed.local_batch_statistics(model):
        volumes = distributed.shard(every)
        extras = Extras(len(volumes), built.num_classes, lcc) if surface else None
        inference = built.inference.for_mode(mode)
        if windows is not None and mode == "batch":
            inference = dataclasses.replace(inference, sw_batch_size=windows)
        mine, example = score_each_volume(model, volumes, built.num_classes, inference, surface, extras)
    names = [v.name for v in every]
    totals = _all_volumes(mine, len(every), built.plan.world_size)
    result = summarize(totals, surface, example, case_names=names)
    if extras is not None:
        result.case_errors = _all_volumes(extras.errors, len(every), built.plan.world_size)
        if lcc:
            lcc_totals = _all_volumes(extras.lcc_totals, len(every), built.plan.world_size)
            result.lcc = summarize(lcc_totals, True, None, case_names=names)
    return result


def _all_volumes(mine: torch.Tensor, count: int, world_size: int) -> torch.Tensor:
    """Every volume's rows from every rank's share (shard() gives rank r the volumes r, r + world, ...)."""
    if world_size == 1:
        return mine
    every = torch.zeros(count, *mine.shape[1:], dtype=mine.dtype)
    every[distributed.rank() :: world_size] = mine
    return distributed.sum_across_ranks(every)


def precise_bn_batches(built: Built, samples: int | None = None) -> Iterator[torch.Tensor]:
    """Training patches for PreciseBN, drawn from a seed stream the training batches never use.

    With several ranks, norms that synchronize over ranks do so as in training: each rank takes its slice of
    every global batch (the same number of forwards on every rank) and the layers merge their statistics.
    Other BatchNorm layers saw only their rank's batch in training: every rank runs all the batches itself,
    with no communication, and gets the same statistics.
    """
    plan, cfg = built.plan, built.cfg
    sync = plan.spec.record.syncs_ranks
    rank, world = (distributed.rank(), plan.world_size) if sync else (0, 1)
    samples = int(cfg.trainer.precise_bn_samples) if samples is None else samples
    patches, batches = precise_bn_draw(
        built.data.train, cfg.data, int(cfg.seed), samples, plan.effective_batch, rank, world
    )
    log.info("PreciseBN: BatchNorm statistics over %d training patches", patches)
    return batches


def precise_bn_draw(
    train: Sequence[Volume],
    data_cfg: DictConfig,
    seed: int,
    samples: int,
    effective_batch: int,
    rank: int = 0,
    world: int = 1,
) -> tuple[int, Iterator[torch.Tensor]]:
    """The package's one PreciseBN draw (training, norm-exp-check and the remedy modes use it): (patches,
    batches), at least `samples` training patches in batches of `effective_batch` per rank, from the sampler
    training uses, seeded with a stream the training batches never use (seed + PRECISE_BN_SEED_OFFSET)."""
    sampler = BatchSampler(list(train), data_cfg, seed + PRECISE_BN_SEED_OFFSET, rank, world)
    needed = math.ceil(samples / (effective_batch * world))
    return needed * effective_batch * world, _stoppable_batches(sampler, needed)


def _stoppable_batches(sampler: BatchSampler, count: int) -> Iterator[torch.Tensor]:
    """The sampler's first `count` batches' images, with a stop point before each (PreciseBN is thousands of
    forwards with a large trainer.precise_bn_samples)."""
    for i in range(count):
        stop_point()
        yield sampler.batch(i)[0]


def evaluate_bn_modes(built: Built, running: ValResult) -> dict[str, ValResult]:
    """Scores under BatchNorm's three evaluation modes, without retraining.

    running: the running averages BatchNorm kept during training (what model.eval() uses).
    batch:   each forward normalizes with its own statistics: trainer.batch_stats_windows windows of one
             volume at a time (trainer.sw_batch_size by default; 1 = each window alone).
    precise: population statistics recomputed over training patches after training (PreciseBN), on a copy,
             with the forwards under the training precision (autocast), as the statistics were seen in training.
    With trainer.remedy_modes, two remedies a user would try (docs/explanation/batchnorm_at_batch_1.md):
    batch_alone:  batch statistics of each window alone (skipped when "batch" already uses one window);
    precise_more: PreciseBN over REMEDY_PRECISE_FACTOR times the patches.
    Each mode is a phase a stop request can interrupt (signals.stop_point); the ranks of a torchrun launch
    agree on stopping between modes.
    """
    samples = int(built.cfg.trainer.precise_bn_samples)
    modes: dict[str, Callable[[], ValResult]] = {
        "batch": lambda: evaluate_built(built, built.model, "batch", surface=True),
        "precise": lambda: _precise(built, samples),
    }
    if built.cfg.trainer.get("remedy_modes"):
        windows = built.inference.batch_stats_windows or built.inference.sw_batch_size
        if windows != 1:  # batch statistics of each window alone: what BatchNorm saw in training at batch 1
            modes["batch_alone"] = lambda: evaluate_built(
                built, built.model, "batch", surface=True, windows=1
            )
        modes["precise_more"] = lambda: _precise(built, REMEDY_PRECISE_FACTOR * samples)
    scores = {"running": running}
    for mode, score in modes.items():
        stop_point_all_ranks()
        log.info("final evaluation: %s mode", mode)
        with phase(f"the final evaluation ({mode} mode)"):
            scores[mode] = score()
    return scores


def _precise(built: Built, samples: int) -> ValResult:
    """PreciseBN over `samples` training patches, on a copy (see evaluate_bn_modes)."""
    precise = copy.deepcopy(built.model)
    with built.autocast(), phase("PreciseBN"):
        recompute_bn_statistics(precise, precise_bn_batches(built, samples), built.device)
    # Already equal on every rank, except torch's own SyncBatchNorm (MONAI nets), whose statistics
    # recompute_bn_statistics does not merge: then rank 0's share of the patches decides.
    distributed.broadcast_buffers(precise)
    return evaluate_built(built, precise, surface=True)


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(D, H, W) class map -> (1, K, D, H, W) one-hot (uint8: an eighth of int64's memory)."""
    return torch.nn.functional.one_hot(labels, num_classes).to(torch.uint8).permute(3, 0, 1, 2).unsqueeze(0)
