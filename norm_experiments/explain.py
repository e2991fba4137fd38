"""`norm-exp-explain` (also `python -m norm_experiments.explain`): why BatchNorm trains at batch size 1, and
whether that is fine, measured on the user's own config and data.

    norm-exp-explain
    norm-exp-explain data=msd data.root=/data/Task09_Spleen data.patch_size=[64,64,64]

Takes the overrides of norm-exp-train, always builds the model with BatchNorm (it is BatchNorm being
explained), trains nothing and writes nothing (configs/explain.yaml). Prints four tables and a conclusion
computed from them:
1. how many values each BN channel's statistics are taken over (N×D×H×W), at the configured batch and at 1;
2. one batch's statistics against the running averages of 20 batches (what model.eval() normalizes with);
3. how much the batch statistics vary between batches at batch sizes 1, 2, 4, 8;
4. where that spread comes from at batch size 1: training patches and validation windows grouped by how much
   foreground they hold, and how far each group's statistics lie from the running averages (diagnose/patch_content.py).

    norm-exp-explain trained=outputs/sweeps/norm_sweep_quick/norm=batch,data.batch_size=1,seed=0,...

measures a finished BatchNorm run's trained network instead (its own overrides, its model.pt): per layer, how
far each validation window's own statistics lie from the running statistics, how that goes with the change of
the window's prediction between running and own statistics, and which window contents carry both
(diagnose/trained.py).
Exit status: 0 done, 2 a mistake in the config, the data or the run folder (one `error:` line).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from norm_experiments.command_line import command_line_problem, replay_run_argv, single_run_argv
from norm_experiments.config import CONFIG_DIR, quoting_problem, register_resolvers
from norm_experiments.errors import USER_ERROR_EXIT, UserError

# The body (explain_batchnorm.py) brings torch and MONAI (seconds): imported when it runs, not for --help.
register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="explain")
def hydra_main(cfg: DictConfig) -> None:
    from norm_experiments.explain_batchnorm import explain

    explain(cfg)


def trained_argv(argv: list[str]) -> list[str]:
    """`trained=RUN_DIR`: that run's own overrides (command_line.replay_run_argv), then the rest."""
    return replay_run_argv(argv, "trained")


def main() -> None:
    try:
        sys.argv = single_run_argv(trained_argv(sys.argv), "norm-exp-explain")
        # A wrong group option or key: one line with the closest names, before Hydra starts.
        problem = quoting_problem(sys.argv[1:]) or command_line_problem(sys.argv[1:], "explain")
        if problem:
            raise UserError(problem)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
    hydra_main()


def __getattr__(name: str):
    """The body's names (explain_trained, spread, ...) for code that imports them from the command's module."""
    from norm_experiments import explain_batchnorm

    return getattr(explain_batchnorm, name)


if __name__ == "__main__":
    main()
