"""Scoring in one room (training/evaluate.py): one per-case Dice function and one PreciseBN draw, which
training, norm-exp-check and the label maps use alike (each computed them its own way before)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from norm_experiments.diagnose import case_verdicts, scoring
from norm_experiments.training import evaluate, predictions
from norm_experiments.training.evaluate import DICE, HD95, PRESENT, case_dice, case_mean_dice
from tests.helpers import built_run

PACKAGE = Path(evaluate.__file__).resolve().parents[1]


def test_per_case_dice_from_totals_is_computed_in_one_place() -> None:
    assert predictions.case_dice is evaluate.case_dice
    readers = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if re.search(r"totals\[(DICE|PRESENT)", path.read_text(encoding="utf-8"))
    )
    assert readers == ["training/evaluate.py"], readers
    assert "case_mean_dice" in Path(case_verdicts.__file__).read_text(encoding="utf-8")


def test_case_dice_and_its_mean() -> None:
    totals = torch.zeros(3, 3)
    totals[DICE] = torch.tensor([0.8, 0.0, 0.5])
    totals[HD95] = torch.tensor([2.0, 0.0, 7.0])
    totals[PRESENT] = torch.tensor([1.0, 0.0, 1.0])  # the second class is absent from the case
    assert case_dice(totals, ["a", "b", "c"]) == {"a": 0.800000011920929, "b": None, "c": 0.5}
    assert abs(case_mean_dice(totals) - 0.65) < 1e-6
    assert case_mean_dice(torch.zeros(3, 2)) is None


def test_the_check_draws_the_patches_training_draws_for_precise_bn(tmp_path: Path) -> None:
    run = built_run(tmp_path, ["experiment=smoke", "trainer.precise_bn_samples=6"])
    training = list(evaluate.precise_bn_batches(run.built))
    patches, check = scoring.precise_bn_batches(run.cfg, run.built.data)
    check = list(check)
    assert patches == 6 and len(training) == len(check) == 3  # smoke: batch 2
    for a, b in zip(training, check, strict=True):
        assert torch.equal(a, b)
