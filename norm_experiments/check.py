"""`norm-exp-check` (also `python -m norm_experiments.check`): is a BatchNorm network trained elsewhere fine in
eval mode, on the user's own data?

    norm-exp-check weights=model.pt net=unet.yaml data=msd data.root=/data/Task09_Spleen data.batch_size=1
    norm-exp-check weights=outputs/runs/X   # one of our runs: its model.pt, with the run's own overrides

The network is a Hydra `_target_` config (any MONAI network: a YAML file or inline) or ours (model=, norm= as
in training); the data options are norm-exp-train's `data` group (configs/check.yaml). It prints
1. the validation scores (Dice and HD95 per class) with the running statistics (model.eval()), with PreciseBN
   statistics recomputed on training patches, and with batch statistics;
2. each case's Dice in each mode;
3. the gaps of PreciseBN and of batch statistics over the running statistics, with intervals over cases and
   verdicts (diagnose/case_verdicts.py), and what that many cases can detect;
4. per BatchNorm layer, how far the running statistics sit from each validation volume's statistics, and
   5. each volume's statistics at the layer where they sit farthest;
then a verdict that follows from those numbers, and writes the weights with PreciseBN statistics when asked
(write_repaired=PATH) and PreciseBN is better than the running statistics by more than the margin.
A network without BatchNorm whose InstanceNorm layers keep running statistics is scored in eval mode and with each
window's own statistics (as in training), with the gap's interval and verdict.
Exit status: 0 done (a network without BatchNorm is scored plainly), 2 a mistake in the config, the weights
or the data (one `error:` line).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from norm_experiments import safe_io
from norm_experiments.command_line import command_line_problem, replay_run_argv, single_run_argv
from norm_experiments.config import CONFIG_DIR, path_argument, quoting_problem, register_resolvers
from norm_experiments.errors import USER_ERROR_EXIT, UserError, flush_stdout, guard_stdout

# The body (check_network.py) brings torch and MONAI (seconds): imported when the check runs, not for --help.
register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="check")
def hydra_main(cfg: DictConfig) -> None:
    from norm_experiments.check_network import check

    check(cfg)


def run_folder_argv(argv: list[str]) -> list[str]:
    """`weights=RUN_DIR`, one of our run folders: its model.pt, scored with that run's own overrides (model,
    norm, data, patch size), as norm-exp-explain's trained= reads them; what the command line says after it
    wins. Anything else given as weights= is left to the weights loader."""
    given = [a for a in argv[1:] if a.startswith("weights=")]
    if not given:
        return argv
    run_dir = path_argument(given[-1])
    if not (run_dir.exists() or run_dir.is_symlink()):  # else the grammar's quoting advice came first
        raise UserError(f"weights={run_dir}: no such file or folder")
    if not run_dir.is_dir():
        return argv
    if not (
        run_dir / ".hydra"
    ).is_dir():  # the grammar's and the loader's lines would be about something else
        raise UserError(
            f"weights={run_dir}: refused, a folder where a file is expected, and not a run folder of ours (no "
            f"{run_dir / '.hydra'}); give the weights file (weights=FILE) with the overrides it was trained with"
        )
    if not (run_dir / "model.pt").is_file():
        raise UserError(
            f"weights={run_dir}: the run has no model.pt (it is written when the run completes); to check its "
            f"last checkpoint: weights={run_dir / 'checkpoint.pt'} with the overrides in "
            f"{run_dir / '.hydra' / 'overrides.yaml'}"
        )
    return replay_run_argv(argv, "weights", lambda folder: folder / "model.pt")


def main() -> None:
    try:
        sys.argv = single_run_argv(run_folder_argv(sys.argv), "norm-exp-check")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
    # A wrong group option or key: one line with the closest names, before Hydra starts.
    argv = sys.argv[1:]
    problem = safe_io.argument_problem(argv) or quoting_problem(argv) or command_line_problem(argv, "check")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
    guard_stdout()  # a closed pipe or a full disk on stdout: one line, not a traceback
    hydra_main()
    flush_stdout()


def __getattr__(name: str):
    """The body's names (check, TRUST_FLAG, ...) for code that imports them from the command's module."""
    from norm_experiments import check_network

    return getattr(check_network, name)


if __name__ == "__main__":
    main()
