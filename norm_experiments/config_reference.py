"""docs/reference/configuration.md's generated tables: every config group with its options (the files in
configs/), and every key of config_schema.SCHEMA with its type (what the schema accepts), its default (the
composed default config, or the option file that sets it) and its meaning (the comment beside it in the YAML),
and every registered plug-in (norms, models, dataset layouts: their registries, norm_experiments/plugins.py)
with its config file and its docs line. A plug-in whose YAML lives in a config folder of its own (its record's
`config_dir`) is listed with its group like the files in configs/.

    python -m norm_experiments.config_reference docs/reference/configuration.md

rewrites the text between the markers below; a test fails when the page is stale.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from norm_experiments.config import CONFIG_DIR, register_resolvers
from norm_experiments.config_schema import full_schema

GROUPS_START = "<!-- config groups: written by python -m norm_experiments.config_reference; do not edit -->"
GROUPS_END = "<!-- end of the config groups -->"
KEYS_START = "<!-- config keys: written by python -m norm_experiments.config_reference; do not edit -->"
KEYS_END = "<!-- end of the config keys -->"
PLUGINS_START = "<!-- plug-ins: written by python -m norm_experiments.config_reference; do not edit -->"
PLUGINS_END = "<!-- end of the plug-ins -->"
GROUPS = ("data", "model", "norm", "optim", "trainer", "experiment")
_KEY_LINE = re.compile(
    r"^(?P<indent> *)(?P<key>[A-Za-z_][A-Za-z0-9_]*):(?P<value>[^#]*)(#\s?(?P<comment>.*))?$"
)


class _NoValue:
    """A value every check refuses: its message is what the key accepts."""


def accepted(key: str) -> str:
    return full_schema()[key](_NoValue()) or "anything"


def registries() -> dict:
    """Config group -> the registry of its plug-ins."""
    from norm_experiments.data import registry as layouts
    from norm_experiments.models import registry as models
    from norm_experiments.norms import registry as norms

    return {"data": layouts.REGISTRY, "model": models.REGISTRY, "norm": norms.REGISTRY}


def yaml_comments(path: Path, prefix: str) -> dict[str, str]:
    """'a.b' -> the comment at the end of that key's line (nested keys by indentation)."""
    found: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        match = _KEY_LINE.match(line)
        if not match:
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        if match["comment"]:
            found.setdefault(prefix + ".".join(k for _, k in stack), match["comment"].strip())
    return found


def option_files() -> dict[str, list[Path]]:
    """Each group's option files: those in configs/, and the registered plug-ins' own (which may lie in a
    config folder of their own)."""
    found = {group: set((CONFIG_DIR / group).glob("*.yaml")) for group in GROUPS}
    for group, registry in registries().items():
        found[group].update(path for path in registry.config_files().values() if path.is_file())
    return {group: sorted(paths, key=lambda p: (p.stem, str(p))) for group, paths in found.items()}


def defaults(overrides: tuple[str, ...] = ()) -> dict[str, object]:
    """Every key's value in the composed default config (with `overrides`: e.g. another data option),
    interpolations left as written."""
    register_resolvers()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    plain = OmegaConf.to_container(cfg, resolve=False)
    values: dict[str, object] = {}
    for key in full_schema():
        node: object = plain
        for part in key.split("."):
            node = node.get(part, _NoValue) if isinstance(node, dict) else _NoValue
        if node is not _NoValue:
            values[key] = node
    return values


def option_values(files: dict[str, list[Path]]) -> dict[str, str]:
    """For keys the default config lacks: 'model=basic_unet: [...]' from the first option file setting it."""
    values: dict[str, str] = {}
    for group in ("data", "model", "optim", "trainer"):
        for path in files[group]:
            plain = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            for key, value in _flat(plain, f"{group}.").items():
                values.setdefault(key, f"`{group}={path.stem}`: `{_show(value)}`")
    return values


def _flat(node: object, prefix: str) -> dict[str, object]:
    out: dict[str, object] = {}
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict) and path not in full_schema():
                out.update(_flat(value, path + "."))
            else:
                out[path] = value
    return out


def _show(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value).replace("'", "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


_DEFAULTS_LINE = re.compile(r"^\s*-\s*(?P<group>[\w/]+):\s*(?P<option>[^#\s]*)\s*(#\s?(?P<comment>.*))?$")


def default_options() -> dict[str, tuple[str, str]]:
    """train.yaml's defaults list: group -> (the option chosen, the comment beside it)."""
    found = {}
    for line in (CONFIG_DIR / "train.yaml").read_text(encoding="utf-8").splitlines():
        match = _DEFAULTS_LINE.match(line)
        if match:
            found[match["group"]] = (match["option"], (match["comment"] or "").strip())
    return found


def groups_table(files: dict[str, list[Path]]) -> str:
    chosen = default_options()
    rows = ["| group | options (default first) | what it is |", "| --- | --- | --- |"]
    for group, paths in files.items():
        option, meaning = chosen.get(group, ("", ""))
        names = sorted((p.stem for p in paths), key=lambda name: name != option)  # stable: the default first
        shown = ", ".join(f"`{n}`" for n in names)
        rows.append(f"| `{group}` | {shown} | {_cell(meaning)} |")
    return "\n".join(rows)


def meanings(files: dict[str, list[Path]]) -> dict[str, str]:
    """Each key's comment: train.yaml's, else the default option's, else another option's (not one that says
    the key is unused there), else the comment beside it in config_schema.py."""
    chosen = {group: option for group, (option, _) in default_options().items()}
    in_default = set(defaults())
    comments = yaml_comments(CONFIG_DIR / "train.yaml", "")
    for group, paths in files.items():
        ordered = sorted(paths, key=lambda p: p.stem != chosen.get(group))
        for path in ordered:
            # for a key the default config has, another option's comment may hold only for that option ("the
            # folder that holds images/"): named so
            other = path.stem != chosen.get(group)
            for key, text in yaml_comments(path, f"{group}.").items():
                if not text.lower().startswith("not used"):
                    comments.setdefault(
                        key, f"{group}={path.stem}: {text}" if other and key in in_default else text
                    )
    for key, text in schema_comments().items():
        comments.setdefault(key, text)
    return comments


def schema_comments() -> dict[str, str]:
    source = (Path(__file__).parent / "config_schema.py").read_text(encoding="utf-8")
    return dict(re.findall(r'^\s*"([a-z_.]+)": .*#\s*(.+)$', source, flags=re.MULTILINE))


def data_option_defaults(files: dict[str, list[Path]]) -> dict[str, dict[str, list[str]]]:
    """For the data keys whose default depends on the data option: key -> {value shown: [options]}."""
    by_option = {
        p.stem: defaults((f"data={p.stem}",))
        for p in files["data"]
        if (CONFIG_DIR / "data" / p.name).is_file()
    }
    found: dict[str, dict[str, list[str]]] = {}
    for key in full_schema():
        if not key.startswith("data."):
            continue
        values: dict[str, list[str]] = {}
        for option, composed in by_option.items():
            if key in composed:
                values.setdefault(_show(composed[key]), []).append(option)
        if len(values) > 1:
            found[key] = values
    return found


def _per_option(default: str, values: dict[str, list[str]]) -> str:
    """'`none`: data=synthetic (default); `auto`: data=folder, msd, ...': each value with the options that give
    it, the default's first."""
    chosen = default_options().get("data", ("", ""))[0]
    parts = []
    for value, options in sorted(values.items(), key=lambda item: item[0] != default):
        names = ", ".join(
            f"{o} (default)" if o == chosen else o for o in sorted(options, key=lambda o: o != chosen)
        )
        shown = "required" if value == "???" else f"`{value}`"  # ???: OmegaConf's mark of a missing value
        parts.append(f"{shown}: data={names}")
    return "; ".join(parts)


def keys_table(files: dict[str, list[Path]]) -> str:
    comments = meanings(files)
    composed, elsewhere = defaults(), option_values(files)
    per_option = data_option_defaults(files)
    rows = ["| key | accepts | default | meaning |", "| --- | --- | --- | --- |"]
    for key in full_schema():
        default = f"`{_show(composed[key])}`" if key in composed else elsewhere.get(key, "(set by the code)")
        if key in per_option and key in composed:
            default = _per_option(_show(composed[key]), per_option[key])
        rows.append(
            f"| `{key}` | {_cell(accepted(key))} | {_cell(default)} | {_cell(comments.get(key, ''))} |"
        )
    return "\n".join(rows)


def _replace(page: str, start: str, end: str, table: str) -> str:
    before, rest = page.split(start, 1)
    _, after = rest.split(end, 1)
    return f"{before}{start}\n{table}\n{end}{after}"


def plugins_table() -> str:
    """Every registered norm, model and dataset layout: its config file and its docs line."""
    rows = ["| plug-in | name | config file | what it is |", "| --- | --- | --- | --- |"]
    for registry in registries().values():
        for name, record in registry.records().items():
            path = registry.config_file(record)
            shown = path.relative_to(CONFIG_DIR.parent) if path.is_relative_to(CONFIG_DIR.parent) else path
            rows.append(f"| {registry.kind} | `{name}` | `{shown}` | {_cell(record.summary)} |")
    return "\n".join(rows)


def with_tables(page: str) -> str:
    files = option_files()
    page = _replace(page, GROUPS_START, GROUPS_END, groups_table(files))
    page = _replace(page, PLUGINS_START, PLUGINS_END, plugins_table())
    return _replace(page, KEYS_START, KEYS_END, keys_table(files))


if __name__ == "__main__":
    target = Path(sys.argv[1])
    target.write_text(with_tables(target.read_text(encoding="utf-8")), encoding="utf-8")
