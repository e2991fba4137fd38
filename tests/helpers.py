"""Helpers for tests: compose the real Hydra config, run an entry point as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from norm_experiments.config import CONFIG_DIR, register_resolvers

register_resolvers()


def compose_config(overrides: list[str] | None = None, run_dir: Path | None = None) -> DictConfig:
    """The config `norm-exp-train` would build from these overrides (the real config files)."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides or []))
    with open_dict(cfg):
        cfg.trainer.progress = "none"
    return cfg


def run_cli(
    args: list[str],
    cwd: Path,
    timeout: float = 300,
    module: str = "norm_experiments.train",
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """Run an entry point as a user would, in a subprocess, from `cwd`."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
