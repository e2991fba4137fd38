"""norm-exp-report: turn one or more sweep directories into report.md, CSVs and plots."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from norm_experiments.command_line import SWEEP_MARKER
from norm_experiments.errors import OneLineParser, UserError, exit_on_user_error, flush_stdout, guard_stdout
from norm_experiments.report import file_names, write_report
from norm_experiments.report.analysis import DEFAULT_REFERENCE
from norm_experiments.report.collect import collect
from norm_experiments.report.document import REPORT_TITLE
from norm_experiments.report.provenance import header_lines
from norm_experiments.report.publish import written_before
from norm_experiments.report.verdicts import DEFAULT_MARGIN, HD95_MARGIN, default_margin
from norm_experiments.safe_io import UnsafeFile, os_reason, read_text


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="norm-exp-report",
        description="Summarize sweeps of batch size x norm x seed: which norm to use at which batch size.",
        epilog=(
            "Writes report.md (tables with intervals and verdicts, the reading, plots), report.html (the same, "
            "one self-contained file), results.csv (one row per cell), runs.csv (one row per run), summary.json "
            "(per-case scores) and the PNG plots into --out (default: the first SWEEP_DIR), "
            "or, with --doc, the markdown to that file and the rest into the folder beside it; prints the main "
            "table. Exit status: 0 done, 2 a mistake (one error: line)."
        ),
    )
    parser.add_argument("sweep_dirs", nargs="+", type=Path, metavar="SWEEP_DIR", help="searched at any depth")
    parser.add_argument("--out", type=Path, default=None, help="output dir (default: the first SWEEP_DIR)")
    parser.add_argument(
        "--metric", default="val_dice", help="metrics.json field to compare (default: val_dice)"
    )
    parser.add_argument(
        "--reference",
        default=DEFAULT_REFERENCE,
        help=f"batch-independent norm every other norm is compared with, per batch size and seed; a norm whose "
        f"records say batch_dependent, or one no run trained, is refused (default: {DEFAULT_REFERENCE})",
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=None,
        help="equivalence margin in the metric's units: a difference whose interval lies inside ±MARGIN is "
        f"'equivalent' (default: {DEFAULT_MARGIN} for Dice, {HD95_MARGIN:g} mm for --metric val_hd95)",
    )
    parser.add_argument(
        "--doc",
        type=Path,
        default=None,
        metavar="FILE.md",
        help="write the report to this markdown file (e.g. docs/results.md) with a header naming this command, "
        "the sweep's command, machine, dates and library versions; plots and CSVs go to the folder beside it",
    )
    return parser


def doc_target_problem(doc: Path) -> str | None:
    """--doc replaces FILE.md and FILE.html: refuse when either exists and is not a report of ours (the user's
    notes, a README), whose content would be lost. Ours carry the header line provenance.header_lines writes."""
    for path in (doc, doc.with_suffix(".html")):
        if not (path.exists() or path.is_symlink()):
            continue
        try:
            head = read_text(path, MAX_DOC_BYTES)[:_HEAD_CHARS]
        except (UnsafeFile, OSError):  # a folder, a FIFO, a huge or binary file: not a report of ours
            head = ""
        if not ("Written by" in head and "norm-exp-report" in head):
            return (
                f"--doc {doc}: {path} exists and was not written by norm-exp-report; the report would replace "
                "it: choose another file, or move it away"
            )
    return None


def out_files_problem(
    sweep_dirs: list[Path], out: Path | None, doc: Path | None, reference: str
) -> str | None:
    """The report replaces its files in its folder (--out DIR, the folder beside --doc's document, or by default
    the first SWEEP_DIR, which may be any folder above sweeps): refuse when one exists that no report of ours
    wrote there (the folder's manifest lists ours; the user's results.csv would be lost). A sweep's own folder
    (multirun.yaml) is the report's home, and a document of ours (--doc's, or an older report.md there) vouches
    for its folder's files, written before the manifest existed."""
    if doc is not None:
        folder, how = doc.parent / doc.stem, f"--doc {doc}: "
        if doc.exists():  # doc_target_problem has found it ours
            return None
    else:
        folder = out if out is not None else sweep_dirs[0]
        how = f"--out {out}: " if out is not None else f"{folder} is no sweep's folder (no {SWEEP_MARKER}): "
    if not folder.is_dir() or (folder / SWEEP_MARKER).is_file():
        return None
    if doc is None and _is_our_report(folder / "report.md"):
        return None
    ours = written_before(folder)
    for name in file_names(reference, doc):
        path = folder / name
        if (path.exists() or path.is_symlink()) and name not in ours:
            return (
                f"{how}{path} exists and was not written by norm-exp-report; the report would replace it: "
                "choose another folder (--out DIR), or move it away"
            )
    return None


def _is_our_report(path: Path) -> bool:
    try:
        return read_text(path, MAX_DOC_BYTES).startswith(REPORT_TITLE)
    except (UnsafeFile, OSError, UnicodeDecodeError):
        return False


MAX_DOC_BYTES = 64 * 2**20  # far above any report (docs/results.html embeds its plots)
_HEAD_CHARS = 4000  # the header is the document's first lines


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    # A full disk on stdout: one line, not a traceback; a closed pipe (`| head`, `| true`): the reader wants no
    # more, the files are written: the rest of the output is dropped quietly, exit status 0.
    guard_stdout(quiet_when_closed=True)
    args = _parser().parse_args(argv)
    header = None
    problem = doc_target_problem(args.doc) if args.doc is not None else None
    problem = problem or out_files_problem(args.sweep_dirs, args.out, args.doc, args.reference)
    if problem:
        raise UserError(problem)
    if args.doc is not None:
        given = sys.argv[1:] if argv is None else argv
        header = header_lines(collect(args.sweep_dirs), shlex.join(["norm-exp-report", *given]))
    try:
        report = write_report(
            args.sweep_dirs,
            out_dir=args.out,
            metric=args.metric,
            reference=args.reference,
            doc=args.doc,
            header=header,
            margin=default_margin(args.metric) if args.margin is None else args.margin,
        )
    except (
        OSError
    ) as err:  # --out or --doc where no folder can be made (a file in the way, read-only), a full disk
        where = err.filename or args.doc or args.out or args.sweep_dirs[0]  # write_report names the file
        raise UserError(f"cannot write the report: {where}: {os_reason(err)}") from None
    for line in report.warnings:
        print(f"warning: {line}", file=sys.stderr)
    print(report.table)
    print(f"\nwrote {', '.join(str(p) for p in report.files.values())}")
    flush_stdout()


if __name__ == "__main__":
    main()
