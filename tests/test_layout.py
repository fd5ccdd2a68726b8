"""The layout is the architecture: imports go down the rooms and never round in a circle. Read from the source
(ast), so a lazy import inside a function counts as much as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "server_ext" / "lomas_jupyter_server"
KERNEL = ROOT / "lomas_jupyter"

# room -> the rooms it may import (besides itself). app, cli, demo and launch are the top: wiring and entry points.
MAY_IMPORT = {
    "api": {"service", "store", "errors"},
    "hub": {"service", "store", "errors"},
    "service": {"engine", "store", "errors", "receipts"},
    "engine": {"errors"},
    "store": {"errors"},
    "errors": set(),
    "receipts": set(),  # the signing key and the bytes a receipt signs: cli prints the key without the engine
}
TOP = {"app", "cli", "demo", "launch", "__init__"}


def _modules(package_dir: Path, package: str) -> dict[str, Path]:
    out = {}
    for path in package_dir.rglob("*.py"):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = path
    return out


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every module of ours that `name` imports (outside `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    known = {**_modules(SERVER, "lomas_jupyter_server"), **_modules(KERNEL, "lomas_jupyter")}
    return {name: _imports(name, path, known) for name, path in known.items()}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_imports_only_go_down_the_rooms() -> None:
    wrong = []
    for module, deps in _graph().items():
        if not module.startswith("lomas_jupyter_server"):
            continue
        room = _room(module)
        if room in TOP:
            continue
        for dep in deps:
            if not dep.startswith("lomas_jupyter_server"):
                continue
            target = _room(dep)
            if target != room and target not in MAY_IMPORT[room]:
                wrong.append(f"{module} imports {dep} ({room} may import {sorted(MAY_IMPORT[room])})")
    assert not wrong, "\n".join(wrong)


def test_the_kernel_package_imports_nothing_of_the_server() -> None:
    graph = _graph()
    crossing = [f"{m} -> {d}" for m, deps in graph.items() if m.startswith("lomas_jupyter.") or m == "lomas_jupyter"
                for d in deps if d.startswith("lomas_jupyter_server")]
    assert not crossing
    # and the check itself sees imports: the kernel's magics import its client
    assert "lomas_jupyter.client" in graph["lomas_jupyter.magics"]


def test_no_import_circles() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan: a strongly connected part of more than one module is a circle
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in graph[node]:
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            part = []
            while True:
                top = stack.pop()
                part.append(top)
                if top == node:
                    break
            if len(part) > 1:
                circles.append(sorted(part))

    for module in graph:
        if module not in index:
            visit(module)
    assert not circles, circles


def test_every_room_says_what_it_holds_and_may_import() -> None:
    for room in ("api", "hub", "service", "engine", "store"):
        doc = ast.get_docstring(ast.parse((SERVER / room / "__init__.py").read_text())) or ""
        assert len(doc) > 40, room
        if room != "store":
            assert "May import" in doc, room
