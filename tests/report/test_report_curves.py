"""read_curves and band (report/curves.py): a record's histories are untrusted; whatever they hold, a run's
curves are either read exactly or refused with a reason naming the field (the report then notes it)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from norm_experiments.report import build_report
from norm_experiments.report.collect import Run
from norm_experiments.report.curves import MAX_POINTS, CurveError, band, plot_learning_curves, read_curves
from tests.report.conftest import make_metrics


def run_of(**fields) -> Run:
    data = make_metrics("group", 2, 0, 0.7, **({"global_batch": 4} | fields))
    return Run(path=Path("sweep/run/metrics.json"), mtime=0.0, data=data)


LOSSES = [{"step": 5, "loss": 1.5}, {"step": 10, "loss": None}, {"step": 15, "loss": 1.0}]
VALIDATIONS = [
    {"step": 10, "samples_seen": 40, "val_dice": 0.5},
    {"step": 20, "samples_seen": 80, "val_dice": math.nan},  # no class present: training writes NaN
    {"step": 30, "samples_seen": 120, "val_dice": 0.75},
]


def test_a_record_s_curves_are_read_in_patches_seen() -> None:
    curves = read_curves(run_of(loss_history=LOSSES, history=VALIDATIONS))
    assert curves is not None
    assert curves.loss == ([20.0, 60.0], [1.5, 1.0])  # step x global_batch 4; a null loss is no point
    assert curves.dice == ([40.0, 120.0], [0.5, 0.75])


def test_without_global_batch_the_patches_per_step_come_from_the_totals() -> None:
    curves = read_curves(run_of(global_batch=None, samples_seen=300, steps=100, loss_history=LOSSES))
    assert curves is not None and curves.loss[0] == [15.0, 45.0]


def test_a_record_without_histories_has_no_curves() -> None:
    assert read_curves(run_of()) is None


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"loss_history": {"step": 1}}, "loss_history is not a list"),
        ({"loss_history": [3]}, "loss_history[0] is not an object"),
        (
            {"loss_history": [{"step": "ten", "loss": 1.0}]},
            "loss_history[0].step is 'ten', not an integer >= 0",
        ),
        ({"loss_history": [{"step": -5, "loss": 1.0}]}, "loss_history[0].step is -5, not an integer >= 0"),
        (
            {"loss_history": [{"step": True, "loss": 1.0}]},
            "loss_history[0].step is True, not an integer >= 0",
        ),
        ({"loss_history": [{"step": 5, "loss": "1.0"}]}, "loss_history[0].loss is '1.0', not a number"),
        (
            {"loss_history": [{"step": 5, "loss": math.inf}]},
            "loss_history[0].loss = inf is outside [-inf, inf]",
        ),
        (
            {"loss_history": [{"step": 10, "loss": 1.0}, {"step": 10, "loss": 0.9}]},
            "loss_history[1] does not come after loss_history[0] (patches seen must increase)",
        ),
        (
            {"history": [{"samples_seen": 40, "val_dice": 1.5}]},
            "history[0].val_dice = 1.5 is outside [0, 1]",
        ),
        (
            {"history": [{"samples_seen": 80, "val_dice": 0.5}, {"samples_seen": 40, "val_dice": 0.6}]},
            "history[1] does not come after history[0] (patches seen must increase)",
        ),
        (
            {"global_batch": None, "samples_seen": None, "loss_history": LOSSES},
            "neither global_batch nor samples_seen / steps gives the patches per step",
        ),
        (
            {"loss_history": [{"step": 1, "loss": 1.0}] * (MAX_POINTS + 1)},
            f"loss_history has {MAX_POINTS + 1} entries, more than {MAX_POINTS}",
        ),
    ],
)
def test_a_history_that_breaks_a_rule_is_refused_naming_the_field(fields: dict, reason: str) -> None:
    with pytest.raises(CurveError) as caught:
        read_curves(run_of(**fields))
    assert str(caught.value) == reason


def test_the_band_of_curves_with_different_ranges() -> None:
    """Each curve counts only within its own range, interpolated linearly between its points."""
    found = band([([0.0, 10.0], [1.0, 3.0]), ([5.0, 10.0], [4.0, 6.0])])
    assert found is not None and found.seeds == 2
    assert found.x == [0.0, 5.0, 10.0]
    assert found.mean == [1.0, 3.0, 4.5]  # at 5: (2 + 4) / 2; at 0 only the first curve
    assert found.low == [1.0, 2.0, 3.0] and found.high == [1.0, 4.0, 6.0]
    assert band([([], [])]) is None


def test_a_norm_name_that_reads_as_a_formula_is_drawn_as_text(tmp_path: Path, write_run) -> None:
    """matplotlib reads '$...$' as mathtext, and a malformed formula fails the figure: names are literal."""
    for norm in ("instance", "a$\\frac{b$"):
        for seed in range(2):
            write_run(
                tmp_path,
                norm,
                1,
                seed,
                0.7,
                subdir=f"{len(norm)}/{seed}",
                global_batch=1,
                loss_history=LOSSES,
            )
    drawn = plot_learning_curves(build_report([tmp_path]).analysis, tmp_path / "curves.png")
    assert drawn.path == tmp_path / "curves.png" and drawn.notes == []
    assert drawn.path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
