"""docs/reference/configuration.md's generated tables: every config group and option file, every schema key
with what it accepts, its default and its meaning; a stale page fails here."""

from __future__ import annotations

from pathlib import Path

from norm_experiments import config_reference
from norm_experiments.config import CONFIG_DIR
from norm_experiments.config_schema import SCHEMA

PAGE = Path(__file__).parents[1] / "docs" / "reference" / "configuration.md"


def test_the_page_is_written_from_the_configs_and_the_schema() -> None:
    page = PAGE.read_text(encoding="utf-8")
    assert config_reference.with_tables(page) == page, (
        "docs/reference/configuration.md is stale: "
        "python -m norm_experiments.config_reference docs/reference/configuration.md"
    )


def test_every_key_and_option_is_on_the_page() -> None:
    page = PAGE.read_text(encoding="utf-8")
    for key in SCHEMA:
        assert f"| `{key}` |" in page, key
    for group in config_reference.GROUPS:
        for path in (CONFIG_DIR / group).glob("*.yaml"):
            assert f"`{path.stem}`" in page, path


def test_rows_say_what_a_key_accepts_its_default_and_meaning() -> None:
    page = PAGE.read_text(encoding="utf-8")
    assert (
        "| `data.batch_size` | a whole number >= 1 | `2` | volumes per optimizer step: THE batch size" in page
    )
    assert "| `optim.momentum` | a number in [0, 1) | `optim=sgd`: `0.99` | Nesterov momentum" in page
    assert "| `model` | `unet`, `basic_unet`, `dynunet` |" in page  # the default option first


def test_comments_follow_indentation(tmp_path: Path) -> None:
    yaml = tmp_path / "x.yaml"
    yaml.write_text("a: 1  # top\nb:\n  c: 2   # nested\n  d: 3\ne: 4 # after\n")
    assert config_reference.yaml_comments(yaml, "g.") == {"g.a": "top", "g.b.c": "nested", "g.e": "after"}
