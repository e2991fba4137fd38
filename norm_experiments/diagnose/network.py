"""The network a user hands norm-exp-check: built from a Hydra `_target_` config (checked first: only network
classes of MONAI or ours may be named, no argument may name a URL or pretrained weights, interpolations are
resolved within a budget), or ours from model=/norm=; the weights checked tensor by tensor and matched against
it key by key, with one line naming what differs; and one forward pass that shows the network segments the data."""

from __future__ import annotations

import contextlib
import inspect
import math
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from hydra._internal.utils import _locate
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from norm_experiments import safe_io, safe_yaml
from norm_experiments.data.pipeline import DataBundle
from norm_experiments.diagnose.probe import layer_shapes
from norm_experiments.errors import UserError
from norm_experiments.models import build_model
from norm_experiments.norms import bn_eval_mode, register_monai_norms
from norm_experiments.training.build import network_plan

# Prefixes that wrappers add to every key of a saved state dict: DDP, DataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class Network:
    model: nn.Module
    description: str  # e.g. "monai.networks.nets.UNet" or "ours, model=unet, norm=batch"


def net_config(net: object) -> DictConfig:
    """The `net` key as a config with a _target_: given inline, as the path of a YAML file, or as a MONAI
    bundle's folder; checked (allowed_targets) before anything in it is imported or called, and returned with
    its interpolations resolved (within a budget: resolved_net), checked again."""
    if isinstance(net, str) and Path(net).expanduser().is_dir():
        net = bundle_network(Path(net).expanduser())
    elif isinstance(net, str):
        path = Path(net).expanduser()
        if not path.is_file():
            raise UserError(
                f"net={net}: no such file (give a YAML file with a _target_, a MONAI bundle's folder, or the "
                "network inline)"
            )
        try:
            loaded = safe_yaml.load(safe_io.read_text(path, safe_io.MAX_YAML_BYTES), path)
            net = OmegaConf.create(loaded) if isinstance(loaded, dict) else loaded
        except safe_io.UnsafeFile as err:
            raise UserError(f"net={err}") from None
        except Exception as err:
            raise UserError(f"net={net}: not a readable YAML file ({err.__class__.__name__})") from None
    if not isinstance(net, DictConfig) or "_target_" not in net:
        raise UserError(
            "net: needs a _target_, e.g. net='{_target_: monai.networks.nets.UNet, spatial_dims: 3, ...}'"
        )
    allowed_targets(net)
    net = resolved_net(net)
    allowed_targets(net)  # what the interpolations brought in (from the rest of the config) is checked too
    return net


# A MONAI bundle (monai.bundle): its network is the `network_def` entry of its inference config.
BUNDLE_CONFIGS = ("configs/inference.json", "configs/inference.yaml", "configs/inference.yml")
BUNDLE_NETWORKS = "monai.networks.nets."  # where a bundle's short _target_ names ("UNet") live


def bundle_network(folder: Path) -> DictConfig:
    """A bundle's `network_def` as a network config: short target names completed, `@key` references to plain
    values of the same config filled in. Expressions (`$...`) are refused, never evaluated: they run code."""
    found = next((folder / name for name in BUNDLE_CONFIGS if (folder / name).exists()), None)
    if found is None:
        raise UserError(
            f"net={folder}: a folder, but not a MONAI bundle ({' or '.join(BUNDLE_CONFIGS)} not found)"
        )
    try:
        text = safe_io.read_text(found, safe_io.MAX_JSON_BYTES)
        config = safe_io.parse_json(text, found) if found.suffix == ".json" else safe_yaml.load(text, found)
    except (safe_io.UnsafeFile, UserError) as err:
        raise UserError(f"net={err}") from None
    except Exception as err:
        raise UserError(f"net={found}: not a readable bundle config ({err.__class__.__name__})") from None
    network = config.get("network_def") if isinstance(config, dict) else None
    if not isinstance(network, dict) or "_target_" not in network:
        raise UserError(f"net={found}: no network_def with a _target_ in it")
    network = _filled(network, config, f"{found}: network_def", [safe_yaml.MAX_NODES])
    if isinstance(network["_target_"], str) and "." not in network["_target_"]:
        network["_target_"] = BUNDLE_NETWORKS + network["_target_"]
    return OmegaConf.create(network)


def _filled(node: object, config: dict, where: str, budget: list[int], references: int = 0) -> object:
    """`node` with its `@key` references filled in, at most 4 deep, and at most budget[0] values in all (four
    levels of 150 references each would otherwise expand to 500 million)."""
    budget[0] -= 1
    if budget[0] < 0:
        raise UserError(
            f"{where}: refused, more than {safe_yaml.MAX_NODES} values with its @-references filled in; write "
            "the network out in a YAML file and give that as net="
        )
    if isinstance(node, dict):
        _special_keys(node, where)
        return {
            k: _filled(v, config, f"{where}.{k}", budget, references)
            for k, v in node.items()
            if k not in BUNDLE_NOTES
        }
    if isinstance(node, list):
        return [_filled(v, config, f"{where}[{i}]", budget, references) for i, v in enumerate(node)]
    if isinstance(node, str) and node.startswith(("$", "%")):
        raise UserError(
            f"{where}={node}: an expression or macro, which this check does not evaluate (it could run code); "
            "write the value out in a YAML file and give that as net="
        )
    if isinstance(node, str) and node.startswith("@"):
        value = _referenced(config, node[1:])
        if value is None or references >= 4 or (isinstance(value, str) and value.startswith(("$", "%", "@"))):
            raise UserError(f"{where}={node}: refers to no plain value of the bundle config; write it out")
        return _filled(value, config, f"{where} ({node})", budget, references + 1)
    return node


# monai.bundle's keys about a component rather than arguments of it: _requires_ (components to build first: a
# network needs none of them here) and _desc_ (a description) are left out; _disabled_ and _mode_ change what
# is built, so only their defaults are accepted.
BUNDLE_NOTES = ("_requires_", "_desc_", "_disabled_", "_mode_")
BUNDLE_ID_SEPARATORS = ("::", "#")  # monai.bundle's id separator, and its older spelling


def _special_keys(node: dict, where: str) -> None:
    disabled, mode = node.get("_disabled_", False), node.get("_mode_", "default")
    if disabled not in (False, "false", "False") or mode != "default":
        key = "_disabled_" if disabled not in (False, "false", "False") else "_mode_"
        raise UserError(
            f"{where}.{key}={node[key]}: changes what the bundle builds, which this check does not follow; write "
            "the network out in a YAML file and give that as net="
        )


def _referenced(config: object, reference: str) -> object:
    """The value a bundle id names: "key", or a path into it ("network_def::channels", "a::b::0"; "#" in older
    bundles). None when no such value exists."""
    separator = next((sep for sep in BUNDLE_ID_SEPARATORS if sep in reference), None)
    node = config
    for part in reference.split(separator) if separator else [reference]:
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isascii() and part.isdecimal() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


# A net= config may build a network, nothing else: Hydra imports and calls any _target_ it is given (a shared
# YAML file with builtins.open or a nested _target_ would run code). Targets are named by these modules.
NETWORK_MODULES = ("monai.networks.nets.", "norm_experiments.models.")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")


def allowed_targets(net_cfg: DictConfig) -> None:
    """Refuse, before anything is imported or called, a net config with a _target_ (at any depth) that is
    not a network class of MONAI or ours, an interpolation that calls a resolver (${oc.env:...}), or anything
    that would make the network download (no_download_arguments)."""
    plain = OmegaConf.to_container(net_cfg, resolve=False)
    nodes = list(_targets(plain, "net"))
    classes = [_check_target(f"{where}._target_", node["_target_"]) for where, node in nodes]
    for where, text in _strings(plain, "net"):
        if "${" in text and ":" in text[text.index("${") :]:
            raise UserError(f"{where}={text}: a resolver in a network config is not allowed")
    for (where, node), cls in zip(nodes, classes):
        no_download_arguments(where, cls, node)
    for where, text in _strings(plain, "net"):
        if "://" in text:
            raise UserError(f"{where}={text}: a URL; {_LEAVE_IT_OUT}")


def _targets(node: object, where: str):
    """(where, the dict) for every dict with a _target_, at any depth."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield where, node
        for key, value in node.items():
            if key != "_target_":
                yield from _targets(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _targets(value, f"{where}[{i}]")


# Arguments through which a network class loads weights from elsewhere: MONAI's pretrained (DenseNet,
# EfficientNetBN, ResNetFeatures, MILModel, FlexibleUNet: torch hub or Hugging Face), pretrained_url (HoVerNet),
# weights (TorchVisionFCModel), path_or_repo_id (Transchex), checkpoint (a file it would unpickle).
_DOWNLOAD_ARGUMENT = re.compile(
    r"pretrain|url|download|^weights$|^checkpoint$|path_or_repo_id", re.IGNORECASE
)
NO_DOWNLOADS = "norm-exp-check builds a network without downloading or loading anything"
_LEAVE_IT_OUT = f"{NO_DOWNLOADS} (the weights it checks are the file given as weights=); leave it out"


def no_download_arguments(where: str, cls: type, node: dict) -> None:
    """Refuse a network whose arguments, or whose class's defaults (EfficientNetBN: pretrained=True), name
    pretrained weights or a URL: building it would fetch them (into torch hub's cache, which later builds
    reuse) or unpickle a file, before any check of ours could see them."""
    for key, value in node.items():
        if isinstance(key, str) and _DOWNLOAD_ARGUMENT.search(key) and value:
            raise UserError(f"{where}.{key}={value}: names weights to download or load; {_LEAVE_IT_OUT}")
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return
    for key, parameter in parameters.items():
        default = parameter.default
        if key not in node and _DOWNLOAD_ARGUMENT.search(key) and default is not parameter.empty and default:
            raise UserError(
                f"{where}: {cls.__name__} loads pretrained weights by default ({key}={default!r}), which "
                f"downloads them; set {key}: false ({NO_DOWNLOADS}; the weights it checks are weights=)"
            )


def _strings(node: object, where: str):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _strings(value, f"{where}[{i}]")
    elif isinstance(node, str):
        yield where, node


def _check_target(where: str, target: object) -> type:
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
    return found


# ------------------------------------------------------------------------------------------ interpolations

_REFERENCE = re.compile(r"\$\{([^${}]*)\}")  # ${key}, ${.key}, ${a.b[0]}: another value of the config
_WHOLE_REFERENCE = re.compile(r"\$\{[^${}]*\}")
_MISSING = object()


def resolved_net(net_cfg: DictConfig) -> DictConfig:
    """The net config with its interpolations filled in, as a config of its own (nothing left to resolve).

    OmegaConf resolves `b: [${a}, ${a}]` by copying `a`: nine such lines nine levels deep expand to hundreds of
    millions of values, and `"${a}${a}"` doubles a string at each level. So every reference is first followed
    here, with a budget: keys that interpolate each other (a cycle), a reference to nothing, or more than
    safe_yaml.MAX_NODES values in all are refused in one line, before OmegaConf resolves anything."""
    root = net_cfg._get_root()
    # net= given inline is a node of the whole config, and its interpolations may refer to the rest of it
    inline = root is not net_cfg
    path = tuple(_key_path(net_cfg._get_full_key(None))) if inline else ()
    try:
        _References(OmegaConf.to_container(root, resolve=False), "" if inline else "net").cost(path)
        resolved = OmegaConf.to_container(net_cfg, resolve=True)
    except RecursionError:
        raise UserError(
            "net: its interpolations refer to one another too deeply; write the values out"
        ) from None
    except OmegaConfBaseException as err:
        raise UserError(f"net: an interpolation cannot be resolved: {str(err).splitlines()[0]}") from None
    return OmegaConf.create(resolved)


def _key_path(reference: str) -> list[str]:
    return [k for k in reference.replace("[", ".").replace("]", "").split(".") if k]


class _References:
    """Follows the interpolations of a plain (unresolved) config, counting the values each node expands to."""

    def __init__(self, root: object, name: str, budget: int = safe_yaml.MAX_NODES) -> None:
        self.root, self.name, self.budget = root, name, budget
        self.costs: dict[tuple, int] = {}
        self.open: list[tuple] = []

    def shown(self, path: tuple) -> str:
        return ".".join((self.name, *path) if self.name else path) or "net"

    def cost(self, path: tuple) -> int:
        if path in self.costs:
            return self.costs[path]
        if path in self.open:
            cycle = " -> ".join(self.shown(p) for p in [*self.open[self.open.index(path) :], path])
            raise UserError(
                f"{self.shown(path)}: interpolations that refer to each other ({cycle}); write the values out"
            )
        self.open.append(path)
        value = self.value(path)
        if isinstance(value, dict):
            total = 1 + sum(self.cost((*path, str(k))) for k in value)
        elif isinstance(value, list):
            total = 1 + sum(self.cost((*path, str(i))) for i in range(len(value)))
        elif isinstance(value, str) and "${" in value:
            if "${" in _REFERENCE.sub("", value):
                raise UserError(
                    f"{self.shown(path)}={value}: a nested interpolation, which a network config may not hold"
                )
            total = 1 + len(value) // 100
            for reference in _REFERENCE.findall(value):
                target = self.target(path, reference)
                if target is None or self.value(target) is _MISSING:
                    raise UserError(
                        f"{self.shown(path)}={value}: refers to {reference.strip()}, which the config does not have"
                    )
                total += self.cost(target)
        else:
            total = 1 + len(str(value)) // 100
        self.open.pop()
        if total > self.budget:
            raise UserError(
                f"{self.shown(path)}: refused, its interpolations expand to more than {self.budget} values; write "
                "the values out"
            )
        self.costs[path] = total
        return total

    def target(self, path: tuple, reference: str) -> tuple | None:
        """The path `reference` (absolute, or relative with leading dots) names, seen from the value at `path`."""
        reference = reference.strip()
        dots = len(reference) - len(reference.lstrip("."))
        if dots > len(path):
            return None
        base = path[: len(path) - dots] if dots else ()  # no dot: from the top of the config
        return (*base, *_key_path(reference[dots:]))

    def value(self, path: tuple, hops: int = 0) -> object:
        """The plain value at `path`, following whole-value interpolations on the way (${a}.b); _MISSING if none."""
        node = self.root
        for i, key in enumerate(path):
            if isinstance(node, str) and _WHOLE_REFERENCE.fullmatch(node):
                target = self.target(path[:i], node[2:-1])
                if hops > 100:
                    raise UserError(
                        f"{self.shown(path)}: interpolations that refer to each other; write the values out"
                    )
                node = _MISSING if target is None else self.value(target, hops + 1)
            if isinstance(node, dict):
                node = next((v for k, v in node.items() if str(k) == key), _MISSING)
            elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
                node = node[int(key)]
            else:
                return _MISSING
        return node


# ------------------------------------------------------------------------------------------ building


class _DownloadGuard:
    """While `on`, an audit hook (PEP 578) refuses every URL opened and every socket connected in this process:
    the backstop for a network class that downloads with arguments no_download_arguments does not know. The hook
    is added once, at the first build, and cannot be removed; off, it only compares a string."""

    EVENTS = frozenset({"urllib.Request", "socket.connect", "socket.getaddrinfo", "http.client.connect"})

    def __init__(self) -> None:
        self.installed = False
        self.on = False
        self.tried: str | None = None

    def hook(self, event: str, args: tuple) -> None:
        if self.on and event in self.EVENTS:
            self.tried = self.tried or f"{event} {args[0] if args else ''}"
            raise PermissionError(f"{event}: no downloads while a network is built")

    @contextlib.contextmanager
    def blocking(self) -> Iterator[None]:
        if not self.installed:
            sys.addaudithook(self.hook)
            self.installed = True
        self.on, self.tried = True, None
        try:
            yield
        finally:
            self.on = False


_DOWNLOADS = _DownloadGuard()


@contextlib.contextmanager
def no_downloads(what: str) -> Iterator[None]:
    """Run the block with every URL and socket refused; raises UserError naming `what` if it tried one (also
    when the class caught the refusal and went on)."""
    try:
        with _DOWNLOADS.blocking():
            yield
    finally:
        if _DOWNLOADS.tried:
            raise UserError(
                f"{what} tried to download ({_DOWNLOADS.tried}) while being built, and was stopped: "
                f"{NO_DOWNLOADS}"
            )


def instantiate_net(net_cfg: DictConfig) -> nn.Module:
    target = str(net_cfg._target_)
    register_monai_norms()  # our norm names also work in a MONAI network's norm argument
    try:
        with no_downloads(f"net: {target}"):
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
    spec = network_plan(cfg)[0]  # the norm and the model's shapes checked as training checks them
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
        return f"the weights output {w.shape[0]} classes ({name}), the network {last.shape[0]}" + (
            f", the dataset has {num_classes}" if num_classes != last.shape[0] else ""
        )
    return None


def _run_folder_hint(path: Path) -> str:
    """A model file of one of our runs, given without the run's overrides: say how to check it with them."""
    if (path.parent / ".hydra" / "overrides.yaml").is_file():
        return f"; one of our runs: give its folder, weights={path.parent}, to build the run's own network"
    return ""


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
            f"{_run_folder_hint(path)}"
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
