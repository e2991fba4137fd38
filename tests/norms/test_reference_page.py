"""docs/reference/norms.md is what the registry writes: a norm added, removed or changed without regenerating
the page fails here."""

from __future__ import annotations

from pathlib import Path

from norm_experiments.norms import registry
from norm_experiments.norms.reference_page import page

PAGE = Path(__file__).parents[2] / "docs" / "reference" / "norms.md"


def test_the_committed_page_is_up_to_date() -> None:
    assert PAGE.read_text(encoding="utf-8") == page(), (
        "stale: run python -m norm_experiments.norms.reference_page docs/reference/norms.md"
    )


def test_every_norm_has_a_row_with_its_options() -> None:
    text = page()
    for name, record in registry.records().items():
        (row,) = [line for line in text.splitlines() if line.startswith(f"| `{name}`")]
        assert all(f"`{key}`" in row for key in record.options)
        assert ("| yes |" in row) == (record.batch_dependent or record.bn_family)
