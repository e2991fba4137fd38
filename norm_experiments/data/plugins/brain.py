"""Brain anatomy from the MNI152 template (data/brain.py), generated on first use."""

from __future__ import annotations

from norm_experiments.data.registry import LayoutRecord, register

register(
    LayoutRecord(
        "brain",
        "brain anatomy from the MNI152 template, generated on first use (data.brain)",
        generator="norm_experiments.data.brain:BrainConfig",
    )
)
