"""Size a study from a pilot sweep: the seeds, looks and validation cases that decide its declared questions.

    python scripts/plan_study.py PILOT_SWEEP_DIR --experiment norm_sweep_quick
    python scripts/plan_study.py PILOT_SWEEP_DIR --experiment norm_sweep_quick --cases 6,8,12 --looks 6,10,14

Reads the declared questions of a preset (its hydra.sweeper.study), estimates each question's difference and
variance components (seed, case, seed x case) from the pilot's runs (the questions' cells must be in the
pilot), and simulates the sequential design (norm_experiments/report/simulate.py: the report's own code) for
each candidate number of validation cases and set of looks: the chance that each question and every
question is decided, the family-wise error under that truth, and the mean number of seeds the study runs
to. It also prints, for each question, the seeds a single look at the last look's level needs for 80 %
power to decide (exact noncentral t). A pilot's estimates are noisy: size for the worst question, not the
average one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from norm_experiments.config import CONFIG_DIR, register_resolvers
from norm_experiments.errors import UserError
from norm_experiments.report.analysis import analyze
from norm_experiments.report.collect import collect
from norm_experiments.report.model import paired
from norm_experiments.report.questions import side_scores
from norm_experiments.report.sequential import Design, parse_design, seeds_to_decide
from norm_experiments.report.simulate import simulate, truth_from


def preset_design(experiment: str) -> Design:
    register_resolvers()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    study = cfg.hydra.sweeper.get("study")
    if study is None:
        raise UserError(f"experiment={experiment} declares no study (hydra.sweeper.study)")
    return parse_design(OmegaConf.to_container(study, resolve=True), f"experiment={experiment}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pilot", type=Path, help="a finished sweep with the questions' cells")
    parser.add_argument("--experiment", required=True, help="the preset whose questions to size")
    parser.add_argument(
        "--cases", default="", help="validation cases to try, e.g. 6,8,12 (default: the pilot's)"
    )
    parser.add_argument(
        "--looks", action="append", default=[], help="looks to try, e.g. 6,10,14 (repeatable)"
    )
    parser.add_argument("--studies", type=int, default=1000, help="simulated studies per design")
    args = parser.parse_args(argv)
    try:
        design = preset_design(args.experiment)
        analysis = analyze(collect([args.pilot]))
    except UserError as err:
        sys.exit(f"error: {err}")
    summary = analysis.conditions[0]
    truths, pilot_cases = [], 0
    print(f"Pilot: {args.pilot} ({len(summary.seeds)} seeds); questions of experiment={args.experiment}\n")
    print(
        "| question | observed difference | SD seed | SD case | SD seed x case | cases | single look: seeds for 80 % |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for q in design.questions:
        a = side_scores(summary.cell(q.a.row, q.a.batch_size), q.a, q.metric)
        b = side_scores(summary.cell(q.b.row, q.b.batch_size), q.b, q.metric)
        found = paired(a, b)
        if found is None or found.estimate is None:
            sys.exit(f"error: the pilot has no paired seeds for {q.name}")
        est = found.estimate
        truth = truth_from(est)
        truths.append(truth)
        pilot_cases = est.n_cases
        need = seeds_to_decide(est, design.level(len(design.looks) - 1), q.margin)
        print(
            f"| {q.name} | {est.mean:+.4f} | {truth.var_seed**0.5:.4f} | {truth.var_case**0.5:.4f} | "
            f"{truth.var_e**0.5:.4f} | {est.n_cases} | {need if need else '> 200'} |"
        )
    cases = [int(c) for c in args.cases.split(",") if c] or [pilot_cases]
    looks = [tuple(int(n) for n in text.split(",")) for text in args.looks] or [design.looks]
    names = " | ".join(f"P(decide {q.name})" for q in design.questions)
    print(f"\n| cases | looks | {names} | P(all decided) | family-wise error | mean seeds |")
    print("|---:|---|" + "---:|" * (design.m + 3))
    for c in cases:
        for look in looks:
            candidate = Design(design.questions, look, design.alpha, design.spending, design.margin)
            oc = simulate(candidate, truths, c, args.studies, seed=1)
            rates = " | ".join(f"{oc.decided_rate(i):.2f}" for i in range(design.m))
            print(
                f"| {c} | {', '.join(map(str, look))} | {rates} | {oc.all_decided_rate:.2f} | "
                f"{oc.error_rate:.3f} | {oc.mean_seeds:.1f} |"
            )
    print(f"\n{args.studies} simulated studies per row ({design.spending} spending, α = {design.alpha}).")


if __name__ == "__main__":
    main()
