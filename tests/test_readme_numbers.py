"""Numbers in README.md come from documents written by commands, not from typing: every line the README
quotes from docs/results.md (between its `<!-- quoted from docs/results.md -->` and `<!-- end of quote -->`
markers) must stand in that document verbatim, and the document must say which commands wrote it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quoted_blocks(text: str) -> list[str]:
    return re.findall(r"<!-- quoted from docs/results\.md -->\n(.*?)<!-- end of quote -->", text, re.S)


def test_readme_quotes_docs_results_verbatim() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    results = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    blocks = quoted_blocks(readme)
    assert blocks, "README.md quotes nothing from docs/results.md"
    for block in blocks:
        for line in block.splitlines():
            assert not line.strip() or line in results, f"README line not in docs/results.md: {line}"


def test_docs_results_names_the_commands_that_made_it() -> None:
    results = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    assert (
        "Written by `norm-exp-report outputs/sweeps/norm_sweep_quick " in results
        and "--doc docs/results.md`" in results
    )
    assert "Runs made by `norm-exp-train experiment=norm_sweep_quick`" in results
    assert re.search(r"Machine: .+cores", results) and "Libraries: " in results
    for link in re.findall(r"\]\((results/[^)]+\.png)\)", results):
        assert (ROOT / "docs" / link).is_file(), link
