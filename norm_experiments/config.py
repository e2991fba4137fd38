"""Where the configs live, the resolvers they use, and checks that stop a bad config before any work."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from norm_experiments.errors import UserError

# configs/ sits beside the package in the repository; the README's set-up installs the project in editable
# mode, so this path holds from any working directory.
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

_MAX_DIRNAME = 120


def run_dirname(override_dirname: str) -> str:
    """A folder name for a run from its command-line overrides: readable, filesystem-safe, unique."""
    if not override_dirname:
        return "default"
    name = re.sub(r"[^A-Za-z0-9=,._+-]", "_", override_dirname)
    if len(name) > _MAX_DIRNAME:  # keep it readable; the hash keeps distinct commands apart
        digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:8]
        name = f"{name[: _MAX_DIRNAME - 9]}-{digest}"
    return name


def register_resolvers() -> None:
    """Resolvers used in configs/; registering twice is harmless."""
    if not OmegaConf.has_resolver("run_dirname"):
        OmegaConf.register_new_resolver("run_dirname", run_dirname)


# Keys that change where or how a run executes, not what it computes: left out of the run's identity.
_EXECUTION_KEYS = {
    ("trainer", "device"),
    ("trainer", "progress"),
    ("trainer", "num_threads"),
    ("trainer", "overwrite"),
    ("trainer", "force_resume"),
    ("trainer", "trust_checkpoint"),
    ("trainer", "log_every_steps"),
    ("data", "cache_dir"),
    ("data", "check_files"),
    ("data", "cache_on_device"),  # the same batches wherever the volumes are held
    ("resume",),
    ("name",),
}


def run_identity(cfg: DictConfig) -> str:
    """Hash of the resolved config without output paths and execution-only keys: a run's identity."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    plain.pop("hydra", None)
    for path in _EXECUTION_KEYS:
        node = plain
        for key in path[:-1]:
            node = node.get(key, {})
        if isinstance(node, dict):
            node.pop(path[-1], None)
    text = json.dumps(plain, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise UserError(f"{key}: {message}")


def _positive_int(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value >= 1,
        key,
        f"must be a whole number >= 1, got {value!r}",
    )


def validate_config(cfg: DictConfig) -> None:
    """Check values a typo or an impossible choice would break, naming the key (types and ranges)."""
    for key in (
        "data.batch_size",
        "data.patches_per_volume",
        "trainer.samples",
        "trainer.steps",
        "trainer.validations",
        "trainer.checkpoint_every_samples",
        "trainer.log_every_steps",
        "trainer.sw_batch_size",
        "trainer.precise_bn_samples",
    ):
        _positive_int(cfg, key)
    patch = list(cfg.data.patch_size)
    _require(
        len(patch) == 3 and all(isinstance(p, int) and p >= 1 for p in patch),
        "data.patch_size",
        f"must be three whole numbers >= 1, got {patch}",
    )
    frac = cfg.data.foreground_fraction
    _require(
        isinstance(frac, (int, float)) and 0 <= frac <= 1,
        "data.foreground_fraction",
        f"must be between 0 and 1, got {frac!r}",
    )
    _require(
        cfg.data.intensity in ("auto", "zscore", "ct", "none"),
        "data.intensity",
        f"must be auto, zscore, ct or none, got {cfg.data.intensity!r}",
    )
    _require(
        _valid_spacing(cfg.data.target_spacing),
        "data.target_spacing",
        f"must be null, auto or three numbers > 0 (mm), got {cfg.data.target_spacing!r}",
    )
    _require(
        _valid_modality(cfg.data.get("modality")),
        "data.modality",
        f"must be null, a name (CT) or a list of names, got {cfg.data.get('modality')!r}",
    )
    _require(
        isinstance(cfg.data.cache_on_device, bool),
        "data.cache_on_device",
        f"must be true or false, got {cfg.data.cache_on_device!r}",
    )
    _require(
        cfg.trainer.budget_unit in ("patches", "steps"),
        "trainer.budget_unit",
        f"must be patches or steps, got {cfg.trainer.budget_unit!r}",
    )
    _require(
        cfg.trainer.device in ("auto", "cpu", "cuda"),
        "trainer.device",
        f"must be auto, cpu or cuda, got {cfg.trainer.device!r}",
    )
    _require(
        cfg.trainer.progress in ("auto", "bar", "log", "none"),
        "trainer.progress",
        f"must be auto, bar, log or none, got {cfg.trainer.progress!r}",
    )
    _require(
        cfg.trainer.amp in ("auto", True, False),
        "trainer.amp",
        f"must be auto, true or false, got {cfg.trainer.amp!r}",
    )
    _require(
        cfg.trainer.channels_last in ("auto", True, False),
        "trainer.channels_last",
        f"must be auto, true or false, got {cfg.trainer.channels_last!r}",
    )
    _require(
        0 <= cfg.trainer.sw_overlap < 1,
        "trainer.sw_overlap",
        f"must be in [0, 1), got {cfg.trainer.sw_overlap!r}",
    )
    _require(
        cfg.optim.name in ("adamw", "sgd"), "optim.name", f"must be adamw or sgd, got {cfg.optim.name!r}"
    )
    _require(cfg.optim.lr > 0, "optim.lr", f"must be > 0, got {cfg.optim.lr!r}")
    _require(
        cfg.optim.schedule in ("cosine", "poly", "constant"),
        "optim.schedule",
        f"must be cosine, poly or constant, got {cfg.optim.schedule!r}",
    )
    _require(
        cfg.optim.lr_scaling in ("none", "linear", "sqrt"),
        "optim.lr_scaling",
        f"must be none, linear or sqrt, got {cfg.optim.lr_scaling!r}",
    )
    _require(
        0 <= cfg.optim.warmup_fraction < 1,
        "optim.warmup_fraction",
        f"must be in [0, 1), got {cfg.optim.warmup_fraction!r}",
    )
    if cfg.data.get("fetch"):  # a preset for a dataset that norm-exp-fetch downloads
        root = Path(str(cfg.data.root)).expanduser()
        _require(
            (root / "dataset.json").is_file(),
            f"data={cfg.data.preset}",
            f"dataset not found at {root}; run: norm-exp-fetch {cfg.data.fetch}",
        )
    if cfg.data.layout != "synthetic":
        root = cfg.data.root
        _require(
            root is not None and Path(str(root)).expanduser().is_dir(),
            "data.root",
            f"dataset folder does not exist: {root}",
        )


def _valid_spacing(value: object) -> bool:
    if value is None or value == "auto":
        return True
    if not OmegaConf.is_list(value) or len(value) != 3:
        return False
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value)


def _valid_modality(value: object) -> bool:
    if value is None or isinstance(value, str):
        return True
    return OmegaConf.is_list(value) and len(value) > 0 and all(isinstance(v, str) for v in value)


def output_dir_problem(argv: list[str]) -> str | None:
    """Why the run/sweep folder named on the command line (default outputs/) cannot be created, or None.

    Checked before Hydra starts, because Hydra creates the folder first and would fail with a traceback.
    """
    keys = ("hydra.run.dir=", "hydra.sweep.dir=")
    named = [(a.split("=", 1)[0], a.split("=", 1)[1]) for a in argv if a.startswith(keys)]
    for key, value in named or [("output folder", "outputs")]:
        path = Path(value).expanduser().absolute()
        while not path.exists():
            path = path.parent
        if not path.is_dir():
            return f"{key}={value}: cannot create the folder, {path} is a file"
        if not os.access(path, os.W_OK):
            return f"{key}={value}: cannot create the folder, {path} is not writable"
    return None
