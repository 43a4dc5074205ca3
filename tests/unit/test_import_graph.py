"""The import graph of the library packages: layers only point down, roles never import each other, no circles.

Layers, bottom up: broker/ (the wire contract, no torch), weightsync/ (the torch half of the weight-sync contract),
the roles learner/ and workers/, then rlq/ (the front door, which may import anything). Inside workers/ the two
roles live in rooms of their own (workers/generate/, workers/judge/) and never import each other. Every import
counts, module level or inside a function: a lazy import is still an arrow.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("broker", "weightsync", "learner", "workers", "rlq")
LAYER = {"broker": 0, "weightsync": 1, "learner": 2, "workers": 2, "rlq": 3}
ROOMS = ("workers.generate", "workers.judge")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """Library modules `module` imports (resolved to the longest known module name)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module and name.split(".")[0] in PACKAGES:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {module: _imports(path, module, known) for module, path in modules.items()}


def _room(module: str) -> str | None:
    return next((room for room in ROOMS if module == room or module.startswith(room + ".")), None)


def test_no_upward_arrow_and_no_import_across_roles():
    bad = []
    for module, targets in _graph().items():
        for target in targets:
            mine, theirs = module.split(".")[0], target.split(".")[0]
            if LAYER[theirs] > LAYER[mine]:
                bad.append(f"{module} -> {target} (upward)")
            elif {mine, theirs} == {"learner", "workers"}:
                bad.append(f"{module} -> {target} (learner <-> workers)")
            elif _room(module) and _room(target) and _room(module) != _room(target):
                bad.append(f"{module} -> {target} (generation <-> judge)")
    assert not bad, "\n".join(sorted(bad))


def test_no_circle():
    graph = _graph()
    state: dict[str, int] = defaultdict(int)  # 0 new, 1 on the stack, 2 done
    stack: list[str] = []
    circles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state[nxt] == 1:
                circles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif state[nxt] == 0:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if state[node] == 0:
            visit(node)
    assert not circles, "\n".join(circles)


def test_the_reader_sees_real_arrows():
    """The checks above are only as good as the reader: it must see the arrows the code has."""
    graph = _graph()
    assert "broker.schemas" in graph["learner.broadcast"]
    assert "learner.config" in graph["rlq.config"]
    assert any(t.startswith("workers.") for t in graph["rlq.launch"] | graph["rlq.config"])
