"""The layout's rules, read from the source: no import from a lower floor to a higher one, no import circle.

Floors (docs/architecture.md): common < client < server < simulation. Every import counts, also one inside a
function (those run too, only later).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {"common": 0, "client": 1, "server": 2, "simulation": 3}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for floor in FLOORS for p in (ROOT / floor).rglob("*.py")}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports (a `from package import module` names the module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and modules[name].name != "__init__.py":  # a package's __init__ holds no code here
                found.add(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def floor(module: str) -> int:
    return FLOORS[module.split(".")[0]]


def test_the_floors_exist_and_hold_modules(graph: dict[str, set[str]]) -> None:
    assert {m.split(".")[0] for m in graph} == set(FLOORS)
    assert {"common.protocol", "common.config", "client.app", "server.app", "simulation.cli"} <= set(graph)


def test_no_module_imports_from_a_higher_floor(graph: dict[str, set[str]]) -> None:
    upward = sorted(f"{m} -> {i}" for m, imported in graph.items() for i in imported if floor(i) > floor(m))
    assert upward == []


def test_the_shared_floor_imports_no_side_and_client_no_server(graph: dict[str, set[str]]) -> None:
    """The rules as the issue states them (the floors above imply them; this names the pairs)."""
    assert not [m for m in graph if m.startswith("common") and any(not i.startswith("common") for i in graph[m])]
    assert not [m for m in graph if m.startswith("client") and any(i.startswith(("server", "simulation")) for i in graph[m])]
    assert not [m for m in graph if m.startswith("server") and any(i.startswith("simulation") for i in graph[m])]


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each circle found by a depth-first walk, as the modules along it (first = last)."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in sorted(graph[module]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


def test_there_is_no_import_circle(graph: dict[str, set[str]]) -> None:
    assert import_cycles(graph) == []


def test_the_checker_sees_an_import_in_a_function_and_a_circle(tmp_path: Path) -> None:
    """The rules above can fail: an import inside a function is found, and so is a circle."""
    (tmp_path / "a.py").write_text("def f():\n    from b import x\n")
    (tmp_path / "b.py").write_text("import a\n")
    modules = {"a": tmp_path / "a.py", "b": tmp_path / "b.py"}
    graph = {name: imports_of(path, modules) for name, path in modules.items()}
    assert graph == {"a": {"b"}, "b": {"a"}}
    assert import_cycles(graph) == [["a", "b", "a"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
