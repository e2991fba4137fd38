"""Shared fixtures: a per-session synthetic-data cache, composing the real Hydra config, running the CLI."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
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


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """mount(size_kb): a real small filesystem, for a real full disk (needs root: skipped without), unmounted
    after the test."""
    mounted: list[Path] = []

    def mount(size_kb: int) -> Path:
        folder = tmp_path / f"tmpfs-{len(mounted)}"
        folder.mkdir()
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"a real full disk needs a tmpfs; mounting one failed here: {result.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=False)
