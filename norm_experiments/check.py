"""`norm-exp-check` (also `python -m norm_experiments.check`): is a BatchNorm network trained elsewhere fine in
eval mode, on the user's own data?

    norm-exp-check weights=model.pt net=unet.yaml data=msd data.root=/data/Task09_Spleen data.batch_size=1
    norm-exp-check weights=outputs/runs/X/model.pt experiment=smoke norm=batch   # a network of ours

The network is a Hydra `_target_` config (any MONAI network: a YAML file or inline) or ours (model=, norm= as
in training); the data options are norm-exp-train's `data` group (configs/check.yaml). It prints
1. the validation scores (Dice and HD95 per class) with the running statistics (model.eval()), with PreciseBN
   statistics recomputed on training patches, and with batch statistics;
2. per BatchNorm layer, how far the running statistics sit from each validation volume's statistics, and
   3. each volume's statistics at the layer where they sit farthest;
then a verdict computed from those numbers, and writes the weights with PreciseBN statistics when asked
(write_repaired=PATH) and PreciseBN scores at least as well as the running statistics.
Exit status: 0 done (a network without BatchNorm is scored plainly), 2 a mistake in the config, the weights
or the data (one `error:` line).
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from hydra._internal.utils import _locate
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from torch import nn

from norm_experiments import config_schema as schema
from norm_experiments import safe_io
from norm_experiments.bn_probe import Stats, bn_layers, gap, gap_table, layer_shapes, pre_hooks, table
from norm_experiments.config import CONFIG_DIR, register_resolvers, validate_config
from norm_experiments.data.checks import duplicate_images
from norm_experiments.data.pipeline import BatchSampler, DataBundle, Volume, load_data
from norm_experiments.errors import (
    USER_ERROR_EXIT,
    UserError,
    exit_on_user_error,
    flush_stdout,
    guard_stdout,
)
from norm_experiments.models import build_model, median_spacing
from norm_experiments.models.preflight import preflight
from norm_experiments.norms import bn_eval_mode, make_norm_spec, recompute_bn_statistics, register_monai_norms
from norm_experiments.norms.bn_common import tracks_running_stats
from norm_experiments.norms.eval_modes import _PopulationStats  # exact pooled statistics over windows
from norm_experiments.training import checkpoint as ckpt
from norm_experiments.training.build import amp_dtype, select_device
from norm_experiments.training.evaluate import Inference, ValResult, score_volumes, summarize

register_resolvers()

TRUST_FLAG = "trust_weights=true"
# PreciseBN draws its patches from a seed stream that training never uses, as Run.precise_bn_batches does.
PRECISE_BN_SEED_OFFSET = 1_000_003
# Prefixes that wrappers add to every key of a saved state dict: DDP, DataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
MODE_NAMES = {
    "running": "running statistics (model.eval())",
    "precise": "PreciseBN statistics",
    "batch": "batch statistics",
    "plain": "eval mode",
}


@dataclass
class Network:
    model: nn.Module
    description: str  # e.g. "monai.networks.nets.UNet" or "ours, model=unet, norm=batch"


@dataclass
class Checked:
    """Everything the report prints, from which the verdict is computed."""

    scores: dict[str, ValResult]  # mode -> scores (running/precise/batch, or plain without BatchNorm)
    class_names: list[str]  # foreground classes 1..K
    layer_gaps: dict[str, dict[str, dict[str, float]]]  # BN layer -> volume -> gap() row
    precise_patches: int


# ------------------------------------------------------------------------------------------ the network


def net_config(net: object) -> DictConfig:
    """The `net` key as a config with a _target_: given inline, or as the path of a YAML file; checked
    (allowed_targets) before anything in it is imported or called."""
    if isinstance(net, str):
        path = Path(net).expanduser()
        if not path.is_file():
            raise UserError(
                f"net={net}: no such file (give a YAML file with a _target_, or the network inline)"
            )
        try:
            net = OmegaConf.create(safe_io.read_text(path, safe_io.MAX_YAML_BYTES))
        except safe_io.UnsafeFile as err:
            raise UserError(f"net={err}") from None
        except Exception as err:
            raise UserError(f"net={net}: not a readable YAML file ({err.__class__.__name__})") from None
    if not isinstance(net, DictConfig) or "_target_" not in net:
        raise UserError(
            "net: needs a _target_, e.g. net='{_target_: monai.networks.nets.UNet, spatial_dims: 3, ...}'"
        )
    allowed_targets(net)
    return net


# A net= config may build a network, nothing else: Hydra imports and calls any _target_ it is given (a shared
# YAML file with builtins.open or a nested _target_ would run code). Targets are named by these modules.
NETWORK_MODULES = ("monai.networks.nets.", "norm_experiments.models.")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")


def allowed_targets(net_cfg: DictConfig) -> None:
    """Refuse, before anything is imported or called, a net config with a _target_ (at any depth) that is
    not a network class of MONAI or ours, or an interpolation that calls a resolver (${oc.env:...})."""
    plain = OmegaConf.to_container(net_cfg, resolve=False)
    for where, target in _targets(plain, "net"):
        _check_target(where, target)
    for where, text in _strings(plain, "net"):
        if "${" in text and ":" in text[text.index("${") :]:
            raise UserError(f"{where}={text}: a resolver in a network config is not allowed")


def _targets(node: object, where: str):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_":
                yield f"{where}._target_", value
            else:
                yield from _targets(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _targets(value, f"{where}[{i}]")


def _strings(node: object, where: str):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _strings(value, f"{where}[{i}]")
    elif isinstance(node, str):
        yield where, node


def _check_target(where: str, target: object) -> None:
    """A MONAI or project network class, by its dotted name (only then imported, to check what it is)."""
    allowed = "a network class of monai.networks.nets (e.g. UNet, BasicUNet, DynUNet, SegResNet) or ours"
    if not isinstance(target, str) or not _DOTTED.fullmatch(target) or not target.startswith(NETWORK_MODULES):
        raise UserError(f"{where}={target}: not allowed; a network config may only name {allowed}")
    try:
        found = _locate(target)
    except ImportError:
        raise UserError(f"{where}={target}: no such network class ({allowed})") from None
    # The name alone is not enough: monai.networks.nets.unet.torch.save is reachable by attribute too.
    module = getattr(found, "__module__", "") or ""
    if not (
        isinstance(found, type) and issubclass(found, nn.Module) and f"{module}.".startswith(NETWORK_MODULES)
    ):
        raise UserError(f"{where}={target}: not allowed, not a network class ({allowed})")


def instantiate_net(net_cfg: DictConfig) -> nn.Module:
    target = str(net_cfg._target_)
    register_monai_norms()  # our norm names also work in a MONAI network's norm argument
    try:
        model = hydra.utils.instantiate(net_cfg, _convert_="all")
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise UserError(f"net: {target} refused its arguments: {str(cause).splitlines()[0]}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"net._target_={target}: built a {type(model).__name__}, not a torch network")
    return model


def build_network(
    cfg: DictConfig, num_channels: int, num_classes: int, spacing: list[float] | None = None
) -> Network:
    if cfg.net is not None:
        net_cfg = net_config(cfg.net)
        return Network(instantiate_net(net_cfg), str(net_cfg._target_))
    spec = make_norm_spec(str(cfg.norm.name), **OmegaConf.to_container(cfg.norm.options))
    effective_batch = int(cfg.data.batch_size) * int(cfg.data.patches_per_volume)
    preflight(spec, cfg.model, list(cfg.data.patch_size), effective_batch)
    model = build_model(cfg.model, spec, num_channels, num_classes, spacing)  # DynUNet: as in training
    return Network(model, f"ours, model={cfg.model.name}, norm={spec.name}")


def first_conv(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first convolution (in registration order, which is the forward order of segmentation nets)."""
    return next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)), None)


def unwrap_keys(weights: dict, model: nn.Module) -> dict:
    """Strip a DDP/torch.compile prefix that every key of the file has and none of the network's has."""
    expected = model.state_dict()
    for prefix in WRAPPER_PREFIXES:
        if (
            weights
            and all(k.startswith(prefix) for k in weights)
            and not any(k.startswith(prefix) for k in expected)
        ):
            return {k[len(prefix) :]: v for k, v in weights.items()}
    return weights


def check_finite(path: Path, weights: dict) -> None:
    """Weights with NaN or infinite values score nothing real (every output NaN): refused, naming a tensor."""
    for key, value in weights.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise UserError(
                f"{path}: {key} holds {bad} NaN or infinite value(s); these weights score nothing"
            )


def check_input_channels(model: nn.Module, num_channels: int, data: DataBundle) -> None:
    found = first_conv(model)
    if found is not None and found[1].in_channels != num_channels:
        raise UserError(
            f"net: the network takes {found[1].in_channels} input channel(s) (first conv {found[0]}), the "
            f"dataset {data.info.root} has {num_channels}; set the network's in_channels to {num_channels}"
        )


def weight_problems(expected: dict, weights: dict) -> list[str]:
    """Missing keys, unexpected keys and shape mismatches between the network's and the file's state dicts."""

    def first(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" (and {len(keys) - 3} more)" if len(keys) > 3 else "")

    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    shapes = [
        f"{k} {tuple(weights[k].shape)} in the file vs {tuple(v.shape)} in the network"
        for k, v in expected.items()
        if k in weights and isinstance(weights[k], torch.Tensor) and weights[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {first(missing)}")
    if unexpected:
        problems.append(f"unexpected {first(unexpected)}")
    if shapes:
        problems.append(f"shape {first(shapes)}")
    return problems


def channel_count_mismatch(
    model: nn.Module, weights: dict, num_channels: int, num_classes: int
) -> str | None:
    """When the file's weights differ from the network only in the data's channel or class count, say that
    (the network was built for the data; the file was trained for other data)."""
    found = first_conv(model)
    if found is not None:
        key = f"{found[0]}.weight"
        w = weights.get(key)
        if (
            isinstance(w, torch.Tensor)
            and w.dim() == found[1].weight.dim()
            and w.shape[1] != found[1].weight.shape[1]
        ):
            return f"the weights take {w.shape[1] * found[1].groups} input channel(s) ({key}), the dataset has {num_channels}"
    name, last = list(model.named_parameters())[-1]  # a segmentation head's bias: one value per class
    w = weights.get(name)
    if last.dim() == 1 and isinstance(w, torch.Tensor) and w.dim() == 1 and w.shape[0] != last.shape[0]:
        return f"the weights output {w.shape[0]} classes ({name}), the dataset has {num_classes}"
    return None


def load_into(net: Network, path: Path, weights: dict, data: DataBundle) -> None:
    num_channels, num_classes = data.info.num_channels, len(data.info.labels)
    weights = unwrap_keys(weights, net.model)
    problems = weight_problems(net.model.state_dict(), weights)
    if problems:
        counts = channel_count_mismatch(net.model, weights, num_channels, num_classes)
        if counts:
            raise UserError(f"{path}: {counts} ({data.info.root})")
        raise UserError(
            f"{path}: the weights do not match the network ({net.description}): {'; '.join(problems)}"
        )
    try:
        net.model.load_state_dict(weights)
    except RuntimeError as err:
        raise UserError(f"{path}: the network refused the weights: {str(err).splitlines()[0]}") from None


@torch.no_grad()
def check_forward(model: nn.Module, data: DataBundle, patch: list[int], device: torch.device) -> None:
    """Forward passes on one patch: the network must run on it, output one channel per class, and leave
    BatchNorm more than one value per channel."""
    num_classes = len(data.info.labels)
    image = data.val[0].image[None, :, : patch[0], : patch[1], : patch[2]].to(device)
    try:
        with bn_eval_mode(model, "running"):
            out = model(image)
    except RuntimeError as err:
        raise UserError(
            f"net: a forward pass on one data.patch_size={patch} patch failed: {str(err).splitlines()[0]}"
        ) from None
    if not isinstance(out, torch.Tensor) or out.dim() != image.dim() or out.shape[2:] != image.shape[2:]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"net: outputs {shape} for a patch of shape {tuple(image.shape)}: not a segmentation")
    if out.shape[1] != num_classes:
        names = ", ".join(data.info.labels[i] for i in sorted(data.info.labels))
        raise UserError(
            f"net: the network outputs {out.shape[1]} classes (channels), the dataset {data.info.root} has "
            f"{num_classes} ({names}, background included)"
        )
    # Batch statistics of a single value per channel do not exist (PyTorch raises): a window of one patch
    # must leave more than one voxel at every BatchNorm layer.
    for name, shape in layer_shapes(model, image).items():
        if math.prod(shape[2:]) == 1:
            raise UserError(
                f"data.patch_size={patch}: BatchNorm layer {name} sees {tuple(shape[2:])} voxels per patch, one "
                "value per channel, so its batch statistics cannot be computed; use the patch size of your training"
            )


# ------------------------------------------------------------------------------------------ scoring


def score(model: nn.Module, volumes: list[Volume], num_classes: int, inf: Inference, mode: str) -> ValResult:
    with bn_eval_mode(model, mode):
        totals, _ = score_volumes(model, volumes, num_classes, inf, surface=True)
    return summarize(totals, surface=True)


def score_batch_mode_with_stats(
    model: nn.Module, volumes: list[Volume], num_classes: int, inf: Inference, names: list[str]
) -> tuple[ValResult, dict[str, dict[str, Stats]]]:
    """Batch-statistics scores, and each volume's statistics at each named BN layer's input: pooled over the
    volume's sliding windows (mean and unbiased variance per channel), normalizing as training did."""
    totals = torch.zeros(3, num_classes - 1, dtype=torch.float64)
    stats: dict[str, dict[str, Stats]] = {}
    with bn_eval_mode(model, "batch"):
        for vol in volumes:
            pooled = {name: _PopulationStats() for name in names}
            with pre_hooks(model, names, lambda n, x, pooled=pooled: pooled[n].add(x)):
                volume_totals, _ = score_volumes(model, [vol], num_classes, inf, surface=True)
            totals += volume_totals
            stats[vol.name] = {  # a layer inference never runs (e.g. a deep-supervision head) has none
                n: (p.mean.float().cpu(), (p.m2 / max(p.count - 1, 1)).float().cpu())
                for n, p in pooled.items()
                if p.mean is not None
            }
    return summarize(totals, surface=True), stats


def precise_bn_batches(cfg: DictConfig, data: DataBundle) -> tuple[int, list]:
    """(patches, a generator of batches) as training drew them, for PreciseBN (see Run.precise_bn_batches)."""
    sampler = BatchSampler(data.train, cfg.data, int(cfg.seed) + PRECISE_BN_SEED_OFFSET)
    effective_batch = int(cfg.data.batch_size) * int(cfg.data.patches_per_volume)
    needed = math.ceil(int(cfg.trainer.precise_bn_samples) / effective_batch)
    return needed * effective_batch, (sampler.batch(i)[0] for i in range(needed))


def run_checks(
    model: nn.Module, cfg: DictConfig, data: DataBundle, inf: Inference
) -> tuple[Checked, nn.Module | None]:
    """All scores and statistics; returns the PreciseBN copy of the model too (None without BatchNorm)."""
    num_classes = len(data.info.labels)
    class_names = [data.info.labels[i] for i in sorted(data.info.labels) if i != 0]
    layers = {n: m for n, m in bn_layers(model).items() if tracks_running_stats(m)}
    if not layers:
        plain = {"plain": score(model, data.val, num_classes, inf, "running")}
        return Checked(plain, class_names, {}, 0), None
    scores = {"running": score(model, data.val, num_classes, inf, "running")}
    patches, batches = precise_bn_batches(cfg, data)
    precise = copy.deepcopy(model)
    recompute_bn_statistics(precise, batches, inf.device)
    scores["precise"] = score(precise, data.val, num_classes, inf, "running")
    scores["batch"], stats = score_batch_mode_with_stats(model, data.val, num_classes, inf, list(layers))
    gaps = {
        name: {vol: gap(per_layer[name], layer) for vol, per_layer in stats.items()}
        for name, layer in layers.items()
        if all(name in per_layer for per_layer in stats.values())
    }
    return Checked(scores, class_names, gaps, patches), precise


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


def worst_layer(checked: Checked) -> str:
    """The BN layer whose running mean sits farthest from the volumes' means, on average over volumes."""
    return max(checked.layer_gaps, key=lambda n: mean_of(checked.layer_gaps[n], "mean_gap"))


def mean_of(rows: dict[str, dict[str, float]], key: str) -> float:
    return sum(r[key] for r in rows.values()) / len(rows)


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
        "2. Running statistics (what model.eval() normalizes with) vs each validation volume's, per BatchNorm layer",
        header,
        rows,
        "volume statistics pooled over its sliding windows, normalized as in training (batch statistics); "
        "μ, σ² averaged over channels; gaps per channel, averaged over channels, then mean and max over volumes",
    )


def volume_table(checked: Checked, layer: str) -> str:
    return gap_table(
        checked.layer_gaps[layer],
        f"3. Each validation volume at {layer}, the layer whose running statistics sit farthest from them",
        row="volume",
        of="v",
    )


def verdict(checked: Checked, tolerance: float, repaired: str | None) -> list[str]:
    """Plain sentences whose claims follow from the numbers printed above; `repaired` says what happened to
    the repaired weights (written, not written, or how to write them)."""
    dice = {mode: result.dice_mean for mode, result in checked.scores.items()}
    hd95 = {mode: result.hd95_mean for mode, result in checked.scores.items()}
    r, p, b = dice["running"], dice["precise"], dice["batch"]
    lines = [
        f"Dice in eval mode (running statistics) {r:.3f}, with PreciseBN statistics {p:.3f}, with batch statistics {b:.3f}."
    ]
    layer = worst_layer(checked)
    rows = checked.layer_gaps[layer]
    volume = max(rows, key=lambda v: rows[v]["mean_gap"])
    fit = (
        f"The running statistics sit up to {rows[volume]['mean_gap']:.2f}σ from a validation volume's mean "
        f"({volume}, at {layer}; {mean_of(rows, 'mean_gap'):.2f}σ on average over volumes)."
    )
    best = max(p, b)
    if best - r <= tolerance:
        lines += [
            fit,
            f"Eval mode does not lose accuracy (no repair gains more than {tolerance} Dice): your model is fine "
            "in model.eval() on this data.",
        ]
        return lines + ([repaired] if repaired else [])
    hd_change = ""
    best_mode = "precise" if p >= b else "batch"
    if hd95["running"] is not None and hd95[best_mode] is not None:
        hd_change = f", and HD95 {hd95['running']:.1f} mm against {hd95[best_mode]:.1f} mm"
    lines.append(
        f"Eval mode LOSES accuracy: {best - r:.3f} Dice below the best evaluation ({MODE_NAMES[best_mode]}){hd_change}."
    )
    lines.append(fit)
    retrain = (
        "For a model without this gap, retrain with a batch-independent norm: GroupNorm or InstanceNorm (MONAI: "
        'norm="instance" or ("group", {"num_groups": 8}); here: norm-exp-train norm=group).'
    )
    batch_fix = (
        'run your inference inside norm_experiments.norms.bn_eval_mode(model, "batch") (each sliding-window '
        "batch is then normalized with its own statistics, as in training)"
    )
    if p >= b - tolerance:
        lines.append(f"PreciseBN repairs it: recomputed statistics score {p:.3f} in plain model.eval().")
    elif p - r > tolerance:
        lines.append(
            f"PreciseBN repairs part of it ({p:.3f}: {(p - r) / (b - r):.0%} of what batch statistics gain); "
            f"to get {b:.3f}, {batch_fix}. {retrain}"
        )
    else:
        lines.append(
            f"PreciseBN does not repair it ({p:.3f}): one set of statistics, even recomputed over training "
            f"patches, does not fit volumes whose statistics differ as table 2 shows. Batch statistics do "
            f"({b:.3f}): {batch_fix}. {retrain}"
        )
    return lines + ([repaired] if repaired else [])


# ------------------------------------------------------------------------------------------ repaired weights


def repaired_target(cfg: DictConfig, weights_path: Path) -> Path | None:
    """write_repaired as a path that may be written: never the input, never an existing file."""
    if cfg.write_repaired is None:
        return None
    target = Path(str(cfg.write_repaired)).expanduser()
    if target.resolve() == weights_path.resolve():
        raise UserError(f"write_repaired={target}: that is the input weights; choose a new file")
    if target.exists():
        raise UserError(
            f"write_repaired={target}: already exists; choose a new file (nothing is overwritten)"
        )
    return target


def handle_repaired(
    target: Path | None, checked: Checked, precise: nn.Module | None, tol: float
) -> str | None:
    """Write the PreciseBN weights when asked and not worse than the original; the sentence that says so
    (without write_repaired, a hint when PreciseBN gains more than `tol` Dice)."""
    if precise is None:
        return f"No BatchNorm: nothing to repair, {target} not written." if target else None
    r, p = checked.scores["running"].dice_mean, checked.scores["precise"].dice_mean
    if target is None:
        return (
            "Add write_repaired=PATH to write the weights with PreciseBN statistics." if p > r + tol else None
        )
    if p < r:
        return (
            f"{target} not written: PreciseBN statistics score lower ({p:.4f}) than the original ({r:.4f})."
        )
    if target.exists():  # appeared while checking: still never overwrite
        raise UserError(f"write_repaired={target}: appeared while checking; not overwritten")
    ckpt.save(target, {k: v.cpu() for k, v in precise.state_dict().items()})  # loads on any machine
    return (
        f"Repaired weights written to {target} (a state dict with PreciseBN statistics): loaded into the same "
        f"network, model.eval() scores Dice {p:.3f}."
    )


# ------------------------------------------------------------------------------------------ entry point

# configs/check.yaml's own keys (the rest are norm-exp-train's); `net` is a network config of any shape.
CHECK_KEYS = {
    "weights": schema.text,
    "net": schema.either(schema.text, schema.mapping, schema.optional(schema.text)),
    "write_repaired": schema.optional(schema.text),
    "trust_weights": schema.boolean,
    "tolerance": schema.number(0),
}


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
    if cfg.net is not None:
        net_config(cfg.net)  # refuses a _target_ that is no network before anything else runs
    if cfg.trainer.num_threads:
        torch.set_num_threads(int(cfg.trainer.num_threads))
    weights = ckpt.load_weights(weights_path, trust=bool(cfg.trust_weights), trust_flag=TRUST_FLAG)
    check_finite(weights_path, weights)
    device = select_device(str(cfg.trainer.device))
    data = load_data(cfg.data)
    net = build_network(cfg, data.info.num_channels, len(data.info.labels), median_spacing(data.train))
    check_input_channels(net.model, data.info.num_channels, data)
    load_into(net, weights_path, weights, data)
    net.model.to(device)
    patch = list(cfg.data.patch_size)
    check_forward(net.model, data, patch, device)
    amp = amp_dtype(cfg.trainer.amp, device)
    inf = Inference(
        roi_size=patch,
        sw_batch_size=int(cfg.trainer.sw_batch_size),
        overlap=float(cfg.trainer.sw_overlap),
        device=device,
        autocast=lambda: torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext(),
    )
    print(
        f"Checking {weights_path} (network: {net.description}) on {data.info.root} ({data.info.layout}): "
        f"{len(data.train)} training and {len(data.val)} validation cases, patch {patch}."
    )
    for val_name, train_name in duplicate_images(data.train, data.val):
        print(
            f"LEAKAGE: validation case {val_name} holds the same voxels as training case {train_name}: its "
            "scores measure what the network memorized, not how it generalizes; choose other data.val_cases"
        )
    checked, precise = run_checks(net.model, cfg, data, inf)
    first = next(iter(checked.scores.values()))  # which classes are present does not depend on the mode
    if math.isnan(first.dice_mean):
        raise UserError(
            f"no foreground class appears in the {len(data.val)} validation cases: nothing to score; "
            "choose others with data.val_cases"
        )
    print("\n" + score_table(checked, len(data.val)))
    for c in first.absent:
        print(f"class {checked.class_names[c - 1]} ({c}) is absent from every validation volume: not scored")
    repaired = handle_repaired(target, checked, precise, float(cfg.tolerance))
    if precise is None:
        print(
            "\nNo BatchNorm layer with running statistics in this network: model.eval() uses no statistics "
            "averaged during training, so there is no BatchNorm train/eval gap to check."
        )
        if repaired:
            print(repaired)
        return
    layer = worst_layer(checked)
    print("\n" + layer_table(checked))
    print("\n" + volume_table(checked, layer))
    print("\nVerdict:\n" + "\n".join(verdict(checked, float(cfg.tolerance), repaired)))


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="check")
def hydra_main(cfg: DictConfig) -> None:
    check(cfg)


def main() -> None:
    # A multirun would create a sweep folder under outputs/ before any check could run; one run is enough.
    if {"-m", "--multirun"} & set(sys.argv[1:]):
        print("error: norm-exp-check runs once: drop -m/--multirun", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
    problem = safe_io.argument_problem(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
    guard_stdout()  # a closed pipe or a full disk on stdout: one line, not a traceback
    hydra_main()
    flush_stdout()


if __name__ == "__main__":
    main()
