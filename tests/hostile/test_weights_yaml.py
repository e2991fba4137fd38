"""Weights, networks and YAML from places the project does not control (issue 32, items 2 and 3): YAML is
counted before it is built (aliases, depth, size), bundle references and interpolations are resolved with a
budget, every tensor of a weights file is checked before use, and no network argument may download anything.
In process, on real files; each refusal is one line naming the file or key."""

from __future__ import annotations

import time

import pytest
from omegaconf import OmegaConf

from norm_experiments import safe_yaml
from norm_experiments.config import CONFIG_DIR
from norm_experiments.safe_io import UnsafeFile


def alias_bomb(target: str = "monai.networks.nets.UNet") -> str:
    """'Billion laughs': nine anchors, each a list of nine aliases to the one before; a few hundred bytes that
    expand to 9**9 (387 million) strings when built."""
    lines = [f"_target_: {target}", "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for previous, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]")
    return "\n".join(lines) + "\n"


def big_yaml(mib: float = 3.7) -> str:
    """A mapping of small values, `mib` MiB long: under the 4 MiB a YAML file may have, but each value becomes
    an OmegaConf node of about a kilobyte."""
    lines = ["_target_: monai.networks.nets.UNet", "x:"]
    lines += [f"  k{i}: {i}" for i in range(int(mib * 2**20) // 12)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (alias_bomb(), "expands to more than 50000 values"),
        (big_yaml(), "expands to more than 50000 values"),
        ("".join(" " * i + f"k{i}:\n" for i in range(3000)), "nested more than 64 levels deep"),
        ("x: &a [1, *a]\n", "alias *a (line 1) refers to no complete node"),
        ("a: 1\na: 2\n", "duplicate key a"),
        ("a: !!python/object/apply:os.system [ls]\n", "not valid YAML"),
        ("a: " + "9" * 5000 + "\n", "a number with too many digits"),
    ],
    ids=["alias-bomb", "3.7MiB", "deep", "self-alias", "duplicate", "python-tag", "long-int"],
)
def test_yaml_is_counted_before_it_is_built(text: str, reason: str) -> None:
    start = time.perf_counter()
    with pytest.raises(UnsafeFile) as err:
        safe_yaml.load(text, "net=n.yaml")
    assert time.perf_counter() - start < 1.0
    message = str(err.value)
    assert message.startswith("net=n.yaml: ") and reason in message and "\n" not in message, message


def test_yaml_within_bounds_reads_as_omegaconf_reads_it() -> None:
    """Every config of the project, and OmegaConf's own rules (1e-3 a float, no dates, merges), unchanged."""
    texts = [p.read_text() for p in sorted(CONFIG_DIR.rglob("*.yaml"))]
    texts.append("a: 1e-3\nb: 2020-01-01\nx: &x {k: 1}\ny: {<<: *x, j: [.inf, null, yes]}\n")
    for text in texts:
        assert safe_yaml.load(text, "t") == (OmegaConf.to_container(OmegaConf.create(text)) or None)
