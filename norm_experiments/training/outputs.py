"""What a run records about where it ran: peak memory, the machine, library versions."""

from __future__ import annotations

import os
import platform
import resource
from pathlib import Path

import torch


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter (Linux), so a run in a multirun process measures only itself."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident memory of this process since the last reset, in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> str:
    """The CPU model and core count, plus the GPU when one is used: where a run's timings come from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"{cpu}, {cores} cores"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text


def library_versions() -> dict[str, str]:
    import hydra
    import monai
    import nibabel
    import numpy

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "nibabel": nibabel.__version__,
        "numpy": numpy.__version__,
        "hydra": hydra.__version__,
        "cuda": torch.version.cuda or "none",
    }
