"""The body of `norm-exp-check` (norm_experiments/check.py is the command): scores a network trained elsewhere
in each BatchNorm evaluation mode on the user's data and says whether it is fine in eval mode. See check.py."""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from norm_experiments import config_schema as schema
from norm_experiments import safe_io
from norm_experiments.config import register_resolvers, validate_config
from norm_experiments.data.checks import duplicate_images
from norm_experiments.data.pipeline import load_data
from norm_experiments.diagnose.case_verdicts import (
    MODE_NAMES,
    SHORT_NAMES,
    CaseGaps,
    compare_modes,
    instance_verdict,
    interval,
    mean_of,
    verdict,
    worst_layer,
)
from norm_experiments.diagnose.network import (
    build_network,
    check_forward,
    check_input_channels,
    load_into,
    net_config,
)
from norm_experiments.diagnose.probe import gap_table, table
from norm_experiments.diagnose.scoring import Checked, run_checks
from norm_experiments.errors import UserError, exit_on_user_error
from norm_experiments.models import median_spacing
from norm_experiments.report.verdicts import Verdict
from norm_experiments.training import checkpoint as ckpt
from norm_experiments.training.build import amp_dtype, select_device
from norm_experiments.training.evaluate import Inference
from norm_experiments.training.predictions import Cases, write_label_maps

register_resolvers()

TRUST_FLAG = "trust_weights=true"


# ------------------------------------------------------------------------------------------ printing


def score_table(checked: Checked, num_val: int) -> str:
    names = checked.class_names

    def cell(value: float | None, fmt: str) -> str:
        return "absent" if value is None else format(value, fmt)

    rows = []
    for mode, result in checked.scores.items():
        hd95 = result.hd95_per_class or [None] * len(names)
        label = MODE_NAMES[mode] + (f" ({checked.precise_patches} patches)" if mode == "precise" else "")
        rows.append(
            [
                label,
                cell(result.dice_mean, ".3f"),
                *(cell(d, ".3f") for d in result.dice_per_class),
                cell(result.hd95_mean, ".1f"),
                *(cell(h, ".1f") for h in hd95),
            ]
        )
    header = ["mode", "Dice mean", *(f"Dice {n}" for n in names), "HD95 mean", *(f"HD95 {n}" for n in names)]
    return table(
        f"1. Validation scores ({num_val} volumes, whole-volume sliding window)",
        header,
        rows,
        "Dice per class over the volumes holding it; HD95 (95th-percentile surface distance) in mm, a missed "
        "class counts as the volume's diagonal",
    )


def layer_table(checked: Checked) -> str:
    rows = []
    for name, per_volume in checked.layer_gaps.items():
        any_row = next(iter(per_volume.values()))
        means = [r["batch_mean"] for r in per_volume.values()]
        worst = max(per_volume, key=lambda v: per_volume[v]["mean_gap"])
        rows.append(
            [
                name,
                f"{any_row['running_mean']:.3g}",
                f"{any_row['running_var']:.3g}",
                f"{min(means):.3g} .. {max(means):.3g}",
                f"{mean_of(per_volume, 'mean_gap'):.2f}",
                f"{per_volume[worst]['mean_gap']:.2f}",
                f"{mean_of(per_volume, 'var_gap'):.2f}",
                f"{max(r['var_gap'] for r in per_volume.values()):.2f}",
                worst,
            ]
        )
    header = [
        "BN layer",
        "running μ",
        "running σ²",
        "volumes' μ_v",
        "|μ_v−μ|/σ mean",
        "max",
        "|σ²_v−σ²|/σ² mean",
        "max",
        "farthest volume",
    ]
    return table(
        "4. Running statistics (what model.eval() normalizes with) vs each validation volume's, per BatchNorm layer",
        header,
        rows,
        "volume statistics pooled over its sliding windows, normalized as in training (batch statistics); "
        "μ, σ² averaged over channels; gaps per channel, averaged over channels, then mean and max over volumes",
    )


def volume_table(checked: Checked, layer: str) -> str:
    return gap_table(
        checked.layer_gaps[layer],
        f"5. Each validation volume at {layer}, the layer whose running statistics sit farthest from them",
        row="volume",
        of="v",
    )


def case_table(checked: Checked, gaps: CaseGaps) -> str:
    modes = list(checked.scores)
    rows = [
        [case, *(f"{gaps.dice[m][case]:.3f}" for m in modes)]
        + [f"{gaps.dice[m][case] - gaps.dice['running'][case]:+.3f}" for m in modes if m != "running"]
        for case in gaps.cases
    ]
    header = ["case", *(SHORT_NAMES[m] for m in modes), *(f"{SHORT_NAMES[m]} − running" for m in modes[1:])]
    return table(
        "2. Each validation case's Dice",
        header,
        rows,
        "Dice averaged over the foreground classes the case holds; a case holding none is left out",
    )


def gap_rows_table(gaps: CaseGaps) -> str:
    family = gaps.family
    rows = [
        [f"{SHORT_NAMES[c.label]} − running", f"{c.difference:+.3f}", interval(c), c.verdict.value]
        for c in family.comparisons
    ]
    level = f"{1 - family.alpha_each:.1%}"
    return table(
        f"3. Gaps over the running statistics, on {len(gaps.cases)} cases",
        ["difference", "mean", f"{level} interval", "verdict"],
        rows,
        f"paired over cases (t, df = cases - 1); {level} intervals: Bonferroni over the {family.m} gaps "
        f"(family-wise alpha {family.alpha}); equivalent: the interval lies inside ±{family.margin} Dice "
        "(margin=); the interval covers other cases like these for this trained model, not another training",
    )


# ------------------------------------------------------------------------------------------ repaired weights


def repaired_target(cfg: DictConfig, weights_path: Path) -> Path | None:
    """write_repaired as a path that may be written: never the input, never an existing file."""
    if cfg.write_repaired is None:
        return None
    if not str(cfg.write_repaired).strip():
        raise UserError("write_repaired=: empty; give a new file")
    target = Path(str(cfg.write_repaired)).expanduser()
    if target.resolve() == weights_path.resolve():
        raise UserError(f"write_repaired={target}: that is the input weights; choose a new file")
    if target.exists():
        raise UserError(
            f"write_repaired={target}: already exists; choose a new file (nothing is overwritten)"
        )
    blocking = next((p for p in target.parents if p.exists()), None)  # checked now, not after the whole check
    if blocking is not None and not blocking.is_dir():
        raise UserError(f"write_repaired={target}: {blocking} is a file, not a folder; choose another path")
    return target


def handle_repaired(target: Path | None, gaps: CaseGaps | None, precise: nn.Module | None) -> str | None:
    """Write the PreciseBN weights when asked and PreciseBN is better than the running statistics by more than
    the margin; the sentence that says so (without write_repaired, a hint when it is)."""
    if precise is None or gaps is None:
        return f"No BatchNorm: nothing to repair, {target} not written." if target else None
    gain = gaps.gap("precise")
    margin = gaps.family.margin
    worth_it = gain.verdict == Verdict.BETTER and gain.difference > margin
    if target is None:
        return "Add write_repaired=PATH to write the weights with PreciseBN statistics." if worth_it else None
    if not worth_it:
        return (
            f"{target} not written: PreciseBN minus running statistics is {gain.difference:+.3f} {interval(gain)} "
            f"({gain.verdict.value}); repaired weights are written only when PreciseBN is better and gains more "
            f"than the margin ({margin} Dice)."
        )
    if target.exists():  # appeared while checking: still never overwrite
        raise UserError(f"write_repaired={target}: appeared while checking; not overwritten")
    ckpt.save(target, {k: v.cpu() for k, v in precise.state_dict().items()})  # loads on any machine
    return (
        f"Repaired weights written to {target} (a state dict with PreciseBN statistics): loaded into the same "
        f"network, model.eval() scores Dice {gain.a_mean:.3f}."
    )


# ------------------------------------------------------------------------------------------ entry point

# configs/check.yaml's own keys (the rest are norm-exp-train's); `net` is a network config of any shape.
CHECK_KEYS = {
    "weights": schema.text,
    "net": schema.either(schema.text, schema.mapping, schema.optional(schema.text)),
    "write_repaired": schema.optional(schema.text),
    "trust_weights": schema.boolean,
    # in Dice: a margin of 1 or more calls any model equivalent
    "margin": schema.number(0, 1, open_low=True, open_high=True),
    "save_predictions": schema.optional(schema.text),
}


def inference(cfg: DictConfig, device: torch.device) -> Inference:
    amp = amp_dtype(cfg.trainer.amp, device)
    windows = cfg.trainer.batch_stats_windows
    return Inference(
        roi_size=list(cfg.data.patch_size),
        sw_batch_size=int(cfg.trainer.sw_batch_size),
        overlap=float(cfg.trainer.sw_overlap),
        device=device,
        autocast=lambda: torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext(),
        batch_stats_windows=None if windows is None else int(windows),
    )


@exit_on_user_error
def check(cfg: DictConfig) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(
            f"{', '.join(missing)}: required (e.g. weights=model.pt net=unet.yaml data=msd data.root=DIR)"
        )
    validate_config(cfg, extra=CHECK_KEYS)
    weights_path = Path(str(cfg.weights)).expanduser()
    target = repaired_target(cfg, weights_path)
    predictions = predictions_target(cfg)
    written = False
    try:
        _check(cfg, weights_path, target, predictions)
        written = predictions is not None
    finally:
        release_predictions(predictions, written)


def _check(cfg: DictConfig, weights_path: Path, target: Path | None, predictions: Path | None) -> None:
    if cfg.net is not None:
        net_config(cfg.net)  # refuses a _target_ that is no network before anything else runs
    if cfg.trainer.num_threads:
        torch.set_num_threads(int(cfg.trainer.num_threads))
    weights = ckpt.load_weights(weights_path, trust=bool(cfg.trust_weights), trust_flag=TRUST_FLAG)
    device = select_device(str(cfg.trainer.device))
    data = load_data(cfg.data)
    net = build_network(cfg, data.info.num_channels, len(data.info.labels), median_spacing(data.train))
    check_input_channels(net.model, data.info.num_channels, data)
    load_into(net, weights_path, weights, data)
    net.model.to(device)
    check_forward(net.model, data, list(cfg.data.patch_size), device)
    print(
        f"Checking {weights_path} (network: {net.description}) on {data.info.root} ({data.info.layout}): "
        f"{len(data.train)} training and {len(data.val)} validation cases, patch {list(cfg.data.patch_size)}."
    )
    for val_name, train_name in duplicate_images(data.train, data.val):
        print(
            f"LEAKAGE: validation case {val_name} holds the same voxels as training case {train_name}: its "
            "scores measure what the network memorized, not how it generalizes; choose other data.val_cases"
        )
    inf = inference(cfg, device)
    checked, precise = run_checks(net.model, cfg, data, inf)
    print_results(checked, precise, target, float(cfg.margin), len(data.val))
    if predictions is not None:
        save_label_maps(
            Cases(
                data,
                len(data.info.labels),
                checked.class_names,
                inf,
                list(cfg.data.patch_size),
                bool(cfg.data.pad_to_patch),
            ),
            net.model,
            precise,
            predictions,
        )


def save_label_maps(cases: Cases, model: nn.Module, precise: nn.Module | None, folder: Path) -> None:
    """save_predictions=DIR: each case's label and error maps in every mode the check scored."""
    modes = [("running", model, "running")]
    if precise is not None:
        modes += [("batch", model, "batch"), ("precise", precise, "running")]
    try:
        write_label_maps(cases, modes, folder)
    except OSError as err:
        raise UserError(f"save_predictions={folder}: could not write: {safe_io.os_reason(err)}") from err
    print(f"\nLabel maps and error maps per case and mode: {folder} (docs/howto/view_predictions.md)")


CLAIM = ".norm-exp-check-writing"  # in a save_predictions folder while this check owns it


def predictions_target(cfg: DictConfig) -> Path | None:
    """save_predictions as a folder this check owns from its start: created by it (or empty, and claimed by a
    file created exclusively), so that a folder that is not writable fails before any work, and a second
    check started with the same folder is refused instead of mixing its maps into the first one's."""
    if cfg.save_predictions is None:
        return None
    if not str(
        cfg.save_predictions
    ).strip():  # Path("") is ".": the current folder, which it is not asked for
        raise UserError("save_predictions=: empty; give a new folder")
    folder = Path(str(cfg.save_predictions)).expanduser()
    busy = UserError(f"save_predictions={folder}: another check is writing there; choose a new one")
    if (folder / CLAIM).exists():
        raise busy
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(f"save_predictions={folder}: exists and is not an empty folder; choose a new one")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.close(os.open(folder / CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        raise busy from None
    except OSError as err:
        raise UserError(f"save_predictions={folder}: cannot write there: {safe_io.os_reason(err)}") from None
    return folder


def release_predictions(folder: Path | None, written: bool) -> None:
    """The claim ends: the maps stay when they were written; a folder left empty by a failure is removed."""
    if folder is None:
        return
    (folder / CLAIM).unlink(missing_ok=True)
    if not written:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if empty: nothing of a user's is removed


def print_results(
    checked: Checked, precise: nn.Module | None, target: Path | None, margin: float, num_val: int
) -> None:
    first = next(iter(checked.scores.values()))  # which classes are present does not depend on the mode
    if math.isnan(first.dice_mean):
        raise UserError(
            f"no foreground class appears in the {num_val} validation cases: nothing to score; "
            "choose others with data.val_cases"
        )
    print("\n" + score_table(checked, num_val))
    for c in first.absent:
        print(f"class {checked.class_names[c - 1]} ({c}) is absent from every validation volume: not scored")
    if precise is None:  # no BatchNorm: nothing PreciseBN could repair
        if checked.instance_layers:
            gaps = compare_modes(checked.scores, margin, ("own",))
            print("\nVerdict:\n" + "\n".join(instance_verdict(checked, gaps)))
        else:
            print(
                "\nNo BatchNorm layer with running statistics in this network: model.eval() uses no statistics "
                "averaged during training, so there is no BatchNorm train/eval gap to check."
            )
        repaired = handle_repaired(target, None, None)
        if repaired:
            print(repaired)
        return
    gaps = compare_modes(checked.scores, margin)
    repaired = handle_repaired(target, gaps, precise)
    print("\n" + case_table(checked, gaps))
    print("\n" + gap_rows_table(gaps))
    print("\n" + layer_table(checked))
    print("\n" + volume_table(checked, worst_layer(checked)))
    print("\nVerdict:\n" + "\n".join(verdict(checked, gaps, repaired)))
