"""The built-in synthetic dataset (data/synthetic.py), generated on first use."""

from __future__ import annotations

from norm_experiments.data.registry import LayoutRecord, register

register(
    LayoutRecord(
        "synthetic",
        "ellipsoids with per-case scanner variation, generated on first use (data.synthetic)",
        generator="norm_experiments.data.synthetic:SynthConfig",
    )
)
