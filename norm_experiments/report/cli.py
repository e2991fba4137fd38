"""norm-exp-report: turn one or more sweep directories into report.md, CSVs and plots."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from norm_experiments.errors import exit_on_user_error
from norm_experiments.report import write_report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="norm-exp-report",
        description="Summarize sweeps of batch size x norm x seed: which norm to use at which batch size.",
    )
    parser.add_argument("sweep_dirs", nargs="+", type=Path, metavar="SWEEP_DIR", help="searched at any depth")
    parser.add_argument("--out", type=Path, default=None, help="output dir (default: the first SWEEP_DIR)")
    parser.add_argument(
        "--metric", default="val_dice", help="metrics.json field to compare (default: val_dice)"
    )
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    report = write_report(args.sweep_dirs, out_dir=args.out, metric=args.metric)
    for line in report.warnings:
        print(f"warning: {line}", file=sys.stderr)
    print(report.table)
    print(f"\nwrote {', '.join(str(p) for p in report.files.values())}")


if __name__ == "__main__":
    main()
