"""The package's import graph: no module imports a command's module (train, explain, check, fetch, report's
CLI), so commands share code through library modules, not through each other."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "norm_experiments"
COMMANDS = {
    "norm_experiments.train",
    "norm_experiments.explain",
    "norm_experiments.check",
    "norm_experiments.data.fetch",
    "norm_experiments.report.cli",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_no_module_imports_a_command_module() -> None:
    offenders = {
        module_name(path): sorted(imports_of(path) & COMMANDS)
        for path in PACKAGE.rglob("*.py")
        if imports_of(path) & (COMMANDS - {module_name(path)})
    }
    assert not offenders, offenders
