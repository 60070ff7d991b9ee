"""The package's shape, checked with plain Python: no import cycles, and the model below everything.

Every `import` and `from ... import` in `src/dsv2` is read with `ast` (function-level lazy
imports included: they are dependencies all the same, only deferred), and resolved to the
dsv2 module it names. Two graphs are checked for cycles: modules (`dsv2.train.loop`) and
top-level units (`dsv2.train`, `dsv2.checkpoint`, ...), so that dependencies between
packages run one way. The model (`dsv2.model`) may import only the config and itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "dsv2"
# What model code must never import: the layers that sit above it.
ABOVE_MODEL = ("checkpoint", "engine", "train", "serve", "distributed", "eval", "align", "cli", "launch")


def module_name(path: Path) -> str:
    parts = ("dsv2",) + path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The dsv2 modules `name` imports (a package stands for its __init__)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the submodule pkg.mod when there is one.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            while t and t not in known:   # `import dsv2.a.b.attr` -> the longest known module
                t = t.rpartition(".")[0]
            if t.startswith("dsv2") and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def unit(module: str) -> str:
    """dsv2.train.loop -> dsv2.train; dsv2.checkpoint -> dsv2.checkpoint; dsv2 -> dsv2."""
    return ".".join(module.split(".")[:2])


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (c := visit(n)):
            return c
    return None


def unit_graph(g: dict[str, set[str]]) -> dict[str, set[str]]:
    # The root package's __init__ only re-exports the public API; importing any submodule
    # runs it, but no module depends on it, so it is a unit like the others.
    out: dict[str, set[str]] = {}
    for a, targets in g.items():
        out.setdefault(unit(a), set()).update(unit(b) for b in targets if unit(b) != unit(a))
    return out


def test_the_walker_sees_lazy_and_relative_imports():
    g = graph()
    assert "dsv2.model.attention" in g["dsv2.model.transformer"]      # from .attention import MLA
    assert "dsv2.config" in g["dsv2.model.transformer"]               # from ..config import ModelConfig
    assert "dsv2.checkpoint" in g["dsv2.cli"]                         # lazy, inside _convert()
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle between modules: " + " -> ".join(cycle)


def test_no_cycle_between_packages():
    cycle = find_cycle(unit_graph(graph()))
    assert cycle is None, "packages import each other in a cycle: " + " -> ".join(cycle)


def test_model_imports_nothing_above_it():
    bad = sorted(f"{a} imports {b}" for a, deps in graph().items() if a.startswith("dsv2.model")
                 for b in deps if b.split(".")[1] in ABOVE_MODEL or b == "dsv2")
    assert not bad, "model code must not know the layers above it: " + "; ".join(bad)
