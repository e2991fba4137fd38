"""Resumable checkpoints: everything needed to continue a run exactly, written atomically."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch

from norm_experiments.errors import UserError
from norm_experiments.training.outputs import write_atomic

CHECKPOINT = "checkpoint.pt"  # the latest resumable state
BEST_WEIGHTS = "best_model.pt"  # weights at the best validation Dice
FINAL_WEIGHTS = "model.pt"  # weights at the end of training


def rng_states() -> dict:
    """Every global RNG a run touches. Data sampling and augmentation need none: they are re-seeded from
    (seed, step) for every batch (see data.pipeline.BatchSampler)."""
    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save(path: Path, state: dict) -> None:
    """Serialize to memory first, then write atomically: a crash or a full disk keeps the previous file."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        write_atomic(path, buffer.getvalue())
    except OSError as err:
        raise UserError(f"could not write {path}: {err.strerror or err}; the previous file is kept") from err


def load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file: say which, never guess
        raise UserError(
            f"{path}: not a readable checkpoint ({err.__class__.__name__}); move it away to restart"
        ) from err
