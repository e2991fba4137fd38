"""Size a study from a pilot sweep: the seeds, looks and validation cases that decide its declared questions.

    python scripts/plan_study.py PILOT_SWEEP_DIR --experiment norm_sweep_quick
    python scripts/plan_study.py PILOT_SWEEP_DIR --experiment norm_sweep_quick --cases 6,8,12 --looks 6,10,14
    python scripts/plan_study.py PILOT_SWEEP_DIR --config-dir DIR --experiment my_study   # DIR/experiment/my_study.yaml

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

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from norm_experiments.config import CONFIG_DIR, hydra_quote, register_resolvers
from norm_experiments.errors import (
    OneLineParser,
    UserError,
    exit_on_user_error,
    flush_stdout,
    guard_stdout,
    positive_int,
)
from norm_experiments.report.analysis import analyze
from norm_experiments.report.collect import collect
from norm_experiments.report.model import paired
from norm_experiments.report.questions import side_scores
from norm_experiments.report.sequential import Design, parse_design, seeds_to_decide
from norm_experiments.report.simulate import simulate, truth_from


def preset_design(experiment: str, config_dir: Path | None = None) -> Design:
    """The study design a preset declares: one of configs/experiment/, or of DIR/experiment/ (--config-dir DIR,
    as norm-exp-train takes it)."""
    register_resolvers()
    folder = config_dir.expanduser().absolute() if config_dir else None
    search = [f"hydra.searchpath=[{hydra_quote(f'file://{folder}')}]"] if folder else []
    folders = [CONFIG_DIR / "experiment", *([folder / "experiment"] if folder else [])]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        try:
            cfg = compose("train", overrides=[*search, f"experiment={experiment}"], return_hydra_config=True)
        except Exception as err:  # noqa: BLE001 - Hydra's, OmegaConf's or YAML's refusal of the preset: one line
            found = [f / f"{experiment}.yaml" for f in folders if (f / f"{experiment}.yaml").is_file()]
            if found:  # the preset is there: the error is in it (its YAML, a key, an override)
                first = next(
                    (line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__
                )
                raise UserError(f"--experiment {experiment}: {found[-1]}: {first}") from None
            options = sorted(p.stem for f in folders for p in f.glob("*.yaml"))
            raise UserError(
                f"--experiment {experiment}: no such preset; the options: {', '.join(options)}"
            ) from None
    study = cfg.hydra.sweeper.get("study")
    if study is None:
        raise UserError(f"experiment={experiment} declares no study (hydra.sweeper.study)")
    return parse_design(OmegaConf.to_container(study, resolve=True), f"experiment={experiment}")


def positive_ints(text: str, flag: str, minimum: int = 1) -> tuple[int, ...]:
    """'6,8,12' as numbers, each at least `minimum`, or UserError naming the flag."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{flag} {text}: expected whole numbers separated by commas (e.g. 6,10,14)") from None
    if not values or min(values) < minimum:
        raise UserError(f"{flag} {text}: each must be a whole number >= {minimum}")
    return values


def candidate_looks(text: str) -> tuple[int, ...]:
    looks = positive_ints(text, "--looks", minimum=2)
    if any(b <= a for a, b in zip(looks, looks[1:])):
        raise UserError(f"--looks {text}: the seeds at each look must increase (e.g. 6,10,14)")
    return looks


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    guard_stdout(quiet_when_closed=True)  # `| head`: the reader wants no more; a full disk: one line
    parser = OneLineParser(prog="plan_study.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("pilot", type=Path, help="a finished sweep with the questions' cells")
    parser.add_argument("--experiment", required=True, help="the preset whose questions to size")
    parser.add_argument(
        "--config-dir",
        type=Path,
        default=None,
        help="a folder of your own presets, DIR/experiment/NAME.yaml (as norm-exp-train --config-dir DIR)",
    )
    parser.add_argument(
        "--cases", default="", help="validation cases to try, e.g. 6,8,12 (default: the pilot's)"
    )
    parser.add_argument(
        "--looks", action="append", default=[], help="looks to try, e.g. 6,10,14 (repeatable)"
    )
    parser.add_argument("--studies", type=positive_int, default=1000, help="simulated studies per design")
    args = parser.parse_args(argv)
    cases = positive_ints(args.cases, "--cases", minimum=2) if args.cases else ()
    looks = [candidate_looks(text) for text in args.looks]
    if args.config_dir is not None and not args.config_dir.expanduser().is_dir():
        raise UserError(f"--config-dir {args.config_dir}: no such folder")
    design = preset_design(args.experiment, args.config_dir)
    analysis = analyze(collect([args.pilot]))
    summary = analysis.conditions[0]
    rows, truths, pilot_cases = [], [], 0
    for q in design.questions:  # every question first: an error leaves no half table behind
        a = side_scores(summary.cell(q.a.row, q.a.batch_size), q.a, q.metric)
        b = side_scores(summary.cell(q.b.row, q.b.batch_size), q.b, q.metric)
        found = paired(a, b)
        if found is None or found.estimate is None:
            raise UserError(
                f"the pilot has no paired seeds for {q.name}: it needs runs of {q.a.label()} and of "
                f"{q.b.label()} with the same seeds"
            )
        est = found.estimate
        truth = truth_from(est)
        truths.append(truth)
        pilot_cases = est.n_cases
        need = seeds_to_decide(est, design.level(len(design.looks) - 1), q.margin)
        rows.append(
            f"| {q.name} | {est.mean:+.4f} | {truth.var_seed**0.5:.4f} | {truth.var_case**0.5:.4f} | "
            f"{truth.var_e**0.5:.4f} | {est.n_cases} | {need if need else '> 200'} |"
        )
    where = ""
    if len(analysis.conditions) > 1:  # sized from one; the others are named, not silently left out
        others = ", ".join(c.condition for c in analysis.conditions[1:])
        where = f"; condition {summary.condition} (the pilot's others, not used: {others})"
    print(
        f"Pilot: {args.pilot} ({len(summary.seeds)} seeds{where}); questions of experiment={args.experiment}\n"
    )
    print(
        "| question | observed difference | SD seed | SD case | SD seed x case | cases | single look: seeds for 80 % |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    names = " | ".join(f"P(decide {q.name})" for q in design.questions)
    print(f"\n| cases | looks | {names} | P(all decided) | family-wise error | mean seeds |")
    print("|---:|---|" + "---:|" * (design.m + 3))
    for c in cases or (pilot_cases,):
        for look in looks or [design.looks]:
            candidate = Design(design.questions, look, design.alpha, design.spending, design.margin)
            oc = simulate(candidate, truths, c, args.studies, seed=1)
            rates = " | ".join(f"{oc.decided_rate(i):.2f}" for i in range(design.m))
            print(
                f"| {c} | {', '.join(map(str, look))} | {rates} | {oc.all_decided_rate:.2f} | "
                f"{oc.error_rate:.3f} | {oc.mean_seeds:.1f} |"
            )
    print(f"\n{args.studies} simulated studies per row ({design.spending} spending, α = {design.alpha}).")
    flush_stdout()


if __name__ == "__main__":
    main()
