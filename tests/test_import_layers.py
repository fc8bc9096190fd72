"""The packages form layers and no import goes up (docs/design.md#layers).

core (errors, atomic files, DDP helpers, dataset spec, metrics, inference, evaluator) < datamodules < methods <
benchmark (the runner). A module may import its own layer and the layers below it, at module level or inside a
function alike. Inside benchmark/ no two files import each other, directly or round a longer loop.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("core", "datamodules", "methods", "benchmark")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool, module_level_only: bool = False) -> list[tuple[str, int]]:
    """(dotted name, line) of every import in ``source``; ``from a import b`` yields ``a.b`` (b may be a module)."""
    tree = ast.parse(source)
    nodes = tree.body if module_level_only else ast.walk(tree)
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found += [(f"{base}.{alias.name}" if base else alias.name, node.lineno) for alias in node.names]
    return found


def layer_of(name: str) -> int | None:
    top = name.split(".")[0]
    return LAYERS.index(top) if top in LAYERS else None


def upward_imports(files: dict[str, tuple[str, bool]]) -> list[str]:
    """``files`` maps module name -> (source, is_package); one line per import of a higher layer."""
    problems = []
    for module, (source, is_package) in sorted(files.items()):
        own = layer_of(module)
        if own is None:
            continue
        for name, line in imported_modules(source, module, is_package):
            target = layer_of(name)
            if target is not None and target > own:
                problems.append(f"{module} (line {line}, layer {LAYERS[own]}) imports {name} (layer {LAYERS[target]})")
    return problems


def import_cycles(files: dict[str, tuple[str, bool]], package: str, module_level_only: bool) -> list[list[str]]:
    """Cycles among the files of ``package`` (Tarjan's strongly connected components with more than one file)."""
    modules = {m for m in files if m == package or m.startswith(package + ".")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module in modules:
        source, is_package = files[module]
        for name, _ in imported_modules(source, module, is_package, module_level_only):
            # `from benchmark import run` names the module benchmark.run; `from benchmark.run import x` names x.
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module and name != package:
                graph[module].add(name)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return components


def repository_files(root: Path = REPO) -> dict[str, tuple[str, bool]]:
    files = {}
    for layer in LAYERS:
        for path in sorted((root / layer).rglob("*.py")):
            files[module_name(path, root)] = (path.read_text(encoding="utf-8"), path.name == "__init__.py")
    return files


def test_no_module_imports_from_a_higher_layer():
    files = repository_files()
    assert {name.split(".")[0] for name in files} == set(LAYERS)
    problems = upward_imports(files)
    assert not problems, "imports that go up a layer (docs/design.md#layers):\n" + "\n".join(problems)


def test_the_files_of_the_runner_import_each_other_without_a_cycle():
    cycles = import_cycles(repository_files(), "benchmark", module_level_only=False)
    assert not cycles, "import cycles inside benchmark/: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_checker_reports_a_planted_upward_import_and_a_planted_cycle():
    files = {
        "core": ("", True),
        "core.errors": ("import os\n", False),
        "datamodules": ("", True),
        "datamodules.base": ("from core.errors import UserError\n", False),
        "methods": ("", True),
        "methods.base": ("def f():\n    from benchmark import run\n", False),
        "benchmark": ("", True),
        "benchmark.cli": ("from . import sweep\n", False),
        "benchmark.sweep": ("def plan():\n    from benchmark.cli import build_parser\n", False),
        "benchmark.run": ("from methods.base import f\nfrom core.errors import UserError\n", False),
    }
    assert upward_imports(files) == ["methods.base (line 2, layer methods) imports benchmark.run (layer benchmark)"]
    assert import_cycles(files, "benchmark", module_level_only=False) == [["benchmark.cli", "benchmark.sweep"]]
    assert import_cycles(files, "benchmark", module_level_only=True) == []
    files["datamodules.base"] = ("from ..methods import registry\n", False)
    assert upward_imports(files)[0] == "datamodules.base (line 1, layer datamodules) imports methods.registry (layer methods)"
