"""Shared fixtures: a per-session synthetic-data cache, composing the real Hydra config, running the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The suite starts the real CLI in well over a hundred subprocesses. Where the environment forbids bytecode
# files (PYTHONDONTWRITEBYTECODE, set on some CI machines), each of them compiles the project's modules again;
# a user's Python caches them, and so do the tests' processes.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


@pytest.fixture(scope="session", autouse=True)
def synthetic_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All tests share one synthetic-data cache outside the user's home."""
    cache = tmp_path_factory.mktemp("synthetic-cache")
    os.environ["NORM_EXP_CACHE"] = str(cache)
    return cache


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked cuda need a CUDA GPU: skipped without one (scripts/gpu_check.sh runs them on a GPU)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here): scripts/gpu_check.sh runs it")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
