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
    "norm_experiments.data.synth_cli",
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


def module_imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports when it is loaded: module-level imports (also inside if/try/with and
    class bodies), not those inside functions (deliberately lazy) or under `if TYPE_CHECKING:`. `from pkg
    import sub` counts as importing pkg.sub only (pkg is already being loaded)."""
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = {f"{node.module}.{a.name}" for a in node.names} & modules
                found.update(subs or {node.module})
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ClassDef):
                visit(node.body)
            elif isinstance(node, ast.If | ast.Try | ast.With):
                for block in ("body", "orelse", "finalbody"):
                    visit(getattr(node, block, []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return found & modules


def test_the_import_graph_has_no_circle() -> None:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: module_imports(path, set(paths)) for name, path in paths.items()}
    assert graph["norm_experiments.training.loop"], "the walk finds imports"
    state: dict[str, str] = {}
    circles: list[list[str]] = []

    def walk(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for other in sorted(graph[name]):
            if state.get(other) == "open":
                circles.append(trail[trail.index(other) :] + [name, other])
            elif other not in state:
                walk(other, [*trail, name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            walk(name, [])
    assert not circles, circles
