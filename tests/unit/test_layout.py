"""The import graph reads bottom-up: no arrow back, none sideways between parties, no cycle.

Allowed arrows (imports inside functions count the same as those at the top)::

    client      server      simulation      (the parties and the simulator: never each other)
       \\          |          /
        flowerctl (Flower process control)
              |
            common (the shared library)

The simulation runs the real ClientApp and ServerApp through Flower's simulation engine,
which loads them from ``pyproject.toml`` like any deployment does, so it needs no import of
either party.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "flowerctl", "client", "server", "simulation")
ALLOWED = {
    "common": {"common"},
    "flowerctl": {"flowerctl", "common"},
    "client": {"client", "flowerctl", "common"},
    "server": {"server", "flowerctl", "common"},
    "simulation": {"simulation", "flowerctl", "common"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """Modules of the project that ``path`` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from pkg import mod" imports pkg.mod when that is a module
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    return {
        name: {m for m in project_imports(path) if m in files and m != name}
        for name, path in files.items()
    }


def test_no_import_goes_up_or_sideways() -> None:
    wrong = [
        f"{source} imports {target}"
        for source, targets in graph().items()
        for target in targets
        if target.split(".")[0] not in ALLOWED[source.split(".")[0]]
    ]
    assert wrong == []


def test_no_import_cycles() -> None:
    edges = graph()
    # A package's __init__ re-exporting its own modules is not a cycle of meaning.
    for name in edges:
        edges[name] = {t for t in edges[name] if not (name.startswith(t + "."))}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert cycles == []


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from server import coordinator\n    import client.site\n")
    assert project_imports(source) >= {"server.coordinator", "client.site"}
