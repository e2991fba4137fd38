"""docs/reference/norms.md, written from the norm registry: the page can never list a norm the code lacks or
miss one it has (tests/norms/test_reference_page.py fails when the committed page is stale).

    python -m norm_experiments.norms.reference_page docs/reference/norms.md
"""

from __future__ import annotations

import sys
from pathlib import Path

from norm_experiments.norms import registry

HEADER = """# Normalizations

Written by `python -m norm_experiments.norms.reference_page docs/reference/norms.md` from the norm registry
(`norm_experiments/norms/registry.py`); do not edit by hand. Pick one with `norm=NAME`, change an option with
`norm.options.KEY=VALUE`. *Batch-dependent*: the training-mode output depends on the other samples of the batch.
*Running statistics*: `model.eval()` uses averages kept in training; such norms are scored in BatchNorm's three
evaluation modes ([evaluation modes](../explanation/evaluation_modes.md)).
"""


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def page() -> str:
    rows = [
        "| norm | normalizes over | batch-dependent | running statistics | options (default) |",
        "|---|---|---|---|---|",
    ]
    for name, record in registry.records().items():
        options = ", ".join(f"`{key}` ({option.default})" for key, option in record.options.items()) or "-"
        marker = " (report reference)" if record.report_reference else ""
        rows.append(
            f"| `{name}`{marker} | {record.summary} | {_yes(record.batch_dependent)} | "
            f"{_yes(record.bn_family)} | {options} |"
        )
    return HEADER + "\n" + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m norm_experiments.norms.reference_page OUT.md", file=sys.stderr)
        sys.exit(1)
    Path(args[0]).write_text(page(), encoding="utf-8")


if __name__ == "__main__":
    main()
