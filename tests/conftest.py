"""Shared fixtures: a per-session synthetic-data cache, composing the real Hydra config, running the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def synthetic_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All tests share one synthetic-data cache outside the user's home."""
    cache = tmp_path_factory.mktemp("synthetic-cache")
    os.environ["NORM_EXP_CACHE"] = str(cache)
    return cache
