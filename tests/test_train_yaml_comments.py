"""configs/train.yaml's defaults list names each group's options in a comment. Those names are typed by hand,
so a test keeps them true: every name there is a file of its group, and a list that does not end in `...`
names every file of the group."""

from __future__ import annotations

import re

from norm_experiments.config import CONFIG_DIR


def option_comments() -> dict[str, tuple[list[str], bool]]:
    """group -> (option names in its comment, whether the list is complete: no `...`)."""
    text = (CONFIG_DIR / "train.yaml").read_text(encoding="utf-8")
    block = text[text.index("defaults:") : text.index("\n\n", text.index("defaults:"))]
    found = {}
    for line in block.splitlines():
        match = re.match(r"\s*- (\w+): \S+\s+#(.*)", line)
        if not match or not (CONFIG_DIR / match.group(1)).is_dir() or "|" not in match.group(2):
            continue  # not a group, or a comment that describes the group instead of listing its options
        group, comment = match.groups()
        names = re.findall(r"(?:^|[|:]\s*)([a-z][a-z0-9_]*)\b(?=\s*(?:\(|\||$))", comment.strip())
        found[group] = (names, "..." not in comment)
    return found


def test_every_named_option_exists_and_complete_lists_name_every_option() -> None:
    found = option_comments()
    assert {"data", "model", "norm", "optim", "experiment"} <= found.keys()
    for group, (names, complete) in found.items():
        files = {p.stem for p in (CONFIG_DIR / group).glob("*.yaml")}
        assert names and set(names) <= files, (group, sorted(set(names) - files))
        if complete:
            assert set(names) == files, (group, sorted(files - set(names)))
