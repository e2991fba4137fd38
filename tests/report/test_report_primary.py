"""The declared questions in the report (report/primary.py): answered look by look from the records, study.json
read as untrusted input (a bad one is one line), and a cell of a decided question not run again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from norm_experiments.report import build_report
from norm_experiments.report.primary import power_text, read_study, write_study
from norm_experiments.report.questions import Question, Side
from norm_experiments.report.sequential import Design, parse_design
from norm_experiments.report.verdicts import Verdict
from tests.helpers import assert_clean_failure
from tests.report.conftest import per_case

DESIGN = {
    "looks": [3, 5],
    "questions": {
        "gap": {
            "text": "Does model.eval() lose Dice against batch statistics?",
            "a": {"norm": "batch", "batch_size": 1, "eval": "model"},
            "b": {"norm": "batch", "batch_size": 1, "eval": "batch"},
        },
        "bn_vs_in": {
            "a": {"norm": "batch", "batch_size": 1},
            "b": {"norm": "instance", "batch_size": 1},
        },
    },
}


def sweep(tmp_path: Path, write_run, seeds: range) -> Path:
    """BatchNorm 0.2 below its batch statistics in every case (a clear loss); InstanceNorm level with BatchNorm
    up to noise that changes sign between seeds."""
    for seed in seeds:
        running = {"c1": 0.60 + 0.01 * seed, "c2": 0.62, "c3": 0.58 + 0.005 * seed}
        batch = {c: v + 0.2 for c, v in running.items()}
        write_run(
            tmp_path, "batch", 1, seed, sum(running.values()) / 3,
            eval_modes={"running": sum(running.values()) / 3, "batch": sum(batch.values()) / 3},
            per_case=per_case({"running": running, "batch": batch}),
        )  # fmt: skip
        sign = 1 if seed % 2 else -1
        inst = {c: v + sign * 0.03 for c, v in running.items()}
        write_run(tmp_path, "instance", 1, seed, sum(inst.values()) / 3, per_case=per_case({"running": inst}))
    write_study(tmp_path, parse_design(DESIGN, "test"), "seed cap: the last look was taken", 1.0)
    return tmp_path


def test_questions_are_answered_first_and_decided_at_the_first_look_that_decides(tmp_path, write_run):
    report = build_report([sweep(tmp_path, write_run, range(5))])
    (primary,) = report.analysis.primary
    gap, bn_vs_in = primary.answers
    assert gap.deciding.k == 0 and gap.deciding.seeds == 3 and gap.final.verdict is Verdict.WORSE
    assert gap.final.estimate.mean == pytest.approx(-0.2)
    assert not bn_vs_in.decided and bn_vs_in.final.k == 1 and bn_vs_in.final.seeds == 5
    assert primary.n_looks == 2 and not primary.all_decided
    md = report.markdown
    assert md.index("## Declared questions") < md.index("## Reading") < md.index("## val_dice by norm")
    assert "| gap | batch, bs 1 minus batch (batch stats), bs 1 | 1 of 2 (3 seeds) |" in md
    assert "the sweep stopped: seed cap: the last look was taken" in md
    # The open question says what deciding it would take.
    assert "Open: if the true difference is the one observed" in md
    assert report.table.startswith("Declared questions:\n  gap: worse, Dice -0.200 [")


def test_a_look_waits_for_all_its_seeds(tmp_path, write_run):
    # Four seeds: look 1 (3 seeds) is taken, look 2 (5 seeds) is not, whatever seed 3 says.
    report = build_report([sweep(tmp_path, write_run, range(4))])
    (primary,) = report.analysis.primary
    assert primary.n_looks == 1 and all(a.final.k == 0 for a in primary.answers)


def test_a_study_says_its_wall_time_its_margins_and_why_a_question_has_no_look(tmp_path, write_run):
    """The sweep's minutes (every invocation of its command) were in study.json only; no question's margin was
    shown; "no look yet" blamed 2 seeds on each side for a look that needs 3."""
    sweep(tmp_path, write_run, range(5))
    study_file = json.loads((tmp_path / "study.json").read_text())
    study_file["design"]["max_minutes"] = 14
    (tmp_path / "study.json").write_text(json.dumps({**study_file, "minutes": 12.34}))
    report = build_report([tmp_path])
    assert "the sweep stopped: seed cap: the last look was taken. The sweep ran 12.3 min (cap 14 min)." in (
        report.markdown
    )
    assert "at look 1 (3 seeds); equivalence margin ±0.02." in report.markdown

    two = tmp_path / "two_seeds"
    sweep(two, write_run, range(2))
    (primary,) = build_report([two]).analysis.primary
    assert (
        power_text(primary.answers[0], primary.design)
        == "no look yet: look 1 needs 3 seeds finished on both sides"
    )


@pytest.mark.parametrize(
    "body, needle",
    [
        ("{not json", "study.json: cannot read the study design"),
        ('["a list"]', "study.json: not a JSON object"),
        ('{"design": {"looks": "many", "questions": {}}}', "design.looks"),
        (
            '{"design": {"looks": [3, 5], "questions": {"q": {"a": {"norm": "batch"}}}}}',
            "questions.q.a.batch_size",
        ),
        ('{"design": {"looks": [3, 5], "alpha": 7, "questions": {}}}', "design.alpha"),
        ("[" * 5000 + "]" * 5000, "study.json: cannot read the study design"),
    ],
)
def test_a_bad_study_json_is_one_line(tmp_path, write_run, body, needle):
    sweep(tmp_path, write_run, range(3))
    (tmp_path / "study.json").write_text(body)
    result = subprocess.run(
        [sys.executable, "-m", "norm_experiments.report.cli", str(tmp_path)], capture_output=True, text=True
    )
    assert_clean_failure(result, needle)
    assert not (tmp_path / "report.md").exists()


def test_study_json_round_trips_and_two_different_designs_are_refused(tmp_path, write_run):
    one, two = tmp_path / "one", tmp_path / "two"
    design = parse_design(DESIGN, "test")
    for folder, looks in ((one, (3, 5)), (two, (3, 6))):
        folder.mkdir()
        write_study(folder, Design(design.questions, looks), None, None)
    assert read_study([one]).design == Design(design.questions, (3, 5))
    assert json.loads((one / "study.json").read_text())["design"]["looks"] == [3, 5]
    from norm_experiments.errors import UserError

    with pytest.raises(UserError, match="declare different studies"):
        read_study([one, two])


def test_the_largest_component_side_reads_its_own_scores(tmp_path, write_run):
    from norm_experiments.report.cells import make_cell
    from norm_experiments.report.collect import collect
    from norm_experiments.report.questions import side_scores

    for seed in range(2):
        scores = {"running": {"c1": 0.5, "c2": 0.7}, "running_lcc": {"c1": 0.6, "c2": 0.8}}
        write_run(tmp_path, "instance", 1, seed, 0.6, per_case=per_case(scores))
    cell = make_cell("instance", collect([tmp_path]).runs, "val_dice", 2)
    kept = side_scores(cell, Side("instance", 1, "model_lcc"), "val_dice")
    assert kept.by_seed == {0: pytest.approx(0.7), 1: pytest.approx(0.7)}
    assert kept.by_case[0] == {"c1": 0.6, "c2": 0.8}
    assert Question(
        "q", "", Side("instance", 1, "model_lcc"), Side("instance", 1), "val_dice", 0.02
    ).a.label() == ("instance (largest component), bs 1")


def test_the_power_line_states_the_dice_reference_gap_for_dice_only(tmp_path, write_run):
    """Every Dice question's power line also gives the power at a 0.05 difference; an HD95 question's said
    'a difference of 0.05 mm: 1 %', a reference that means nothing in mm."""
    import dataclasses

    from norm_experiments.report.primary import power_text

    report = build_report([sweep(tmp_path, write_run, range(5))])
    (primary,) = report.analysis.primary
    gap = primary.answers[0]
    assert "; a difference of 0.05: " in power_text(gap, primary.design)
    in_mm = dataclasses.replace(gap, question=dataclasses.replace(gap.question, metric="val_hd95"))
    text = power_text(in_mm, primary.design)
    assert text.startswith("80 % for a difference of ") and " mm (exact noncentral t" in text
    assert "0.05" not in text


def test_a_question_across_batch_sizes_is_named_as_reading_the_budget_too(tmp_path, write_run):
    """A question comparing batch 1 with batch 8 was answered like any other: its verdict reads the optimizer
    steps and learning rate the budget gives each batch size too, and the report now says so."""
    across = {
        "looks": [3],
        "questions": {
            "bs1_vs_bs8": {"a": {"norm": "batch", "batch_size": 1}, "b": {"norm": "batch", "batch_size": 8}},
            "bn_vs_in": {"a": {"norm": "batch", "batch_size": 1}, "b": {"norm": "instance", "batch_size": 1}},
        },
    }
    for seed in range(3):
        for norm, bs, dice in (("batch", 1, 0.6), ("batch", 8, 0.7), ("instance", 1, 0.65)):
            scores = {"c1": dice + 0.01 * seed, "c2": dice}
            write_run(
                tmp_path, norm, bs, seed, sum(scores.values()) / 2, per_case=per_case({"running": scores})
            )
    write_study(tmp_path, parse_design(across, "test"), "seed cap: the last look was taken", 1.0)
    report = build_report([tmp_path])
    (primary,) = report.analysis.primary
    assert primary.notes == [
        "bs1_vs_bs8 compares batch size 1 with 8: the two sides train to the same budget with different numbers "
        "of optimizer steps (or patches) and learning rates, so its verdict reads those with the batch size"
    ]
    assert "- Note: bs1_vs_bs8 compares batch size 1 with 8:" in report.markdown


def test_results_csv_names_the_reference_columns_even_without_reference_runs(tmp_path, write_run):
    """A sweep without the reference norm's runs wrote columns named minus_None_mean, minus_None_verdict..."""
    from norm_experiments.report.csvfiles import results_rows

    for seed in range(2):
        write_run(tmp_path, "batch", 1, seed, 0.6 + 0.01 * seed)
    rows = results_rows(build_report([tmp_path]).analysis)
    assert rows and all(row["minus_instance_verdict"] == "" for row in rows)
    assert not any("None" in key for row in rows for key in row)
