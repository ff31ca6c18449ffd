"""The import graph of ``wsurgery/``: imports point down the layers only, and no modules
import each other in a cycle. Every import counts, those inside functions included;
only ``if TYPE_CHECKING:`` blocks (annotations, never run) are left out.

The layers, lowest first (docs: DESIGN.md "Layers"): a module may import its own layer
and those below it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "wsurgery"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base/model", ("model", "errors", "dtypes", "limits", "show", "devices", "partition", "version")),
    ("transforms", ("transforms", "numpy_apply", "views", "aliases", "selectors", "lookup", "expressions", "merging")),
    ("io", ("io",)),
    ("surgery", ("surgery",)),
    ("compare", ("compare",)),
    ("distributed", ("distributed",)),
    ("api", ("__init__", "api", "inspection", "modules", "testing")),
    ("cli", ("cli", "__main__")),
]

# Edges allowed to point up (importer, imported): none. An allowance for an edge that is
# gone fails the test.
KNOWN_UPWARD: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    for i, (_, names) in enumerate(LAYERS):
        if key in names:
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to DESIGN.md)")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Every import node, skipping the bodies of ``if TYPE_CHECKING:``."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        todo.extend(ast.iter_child_nodes(node))


def imported(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ``wsurgery`` that ``module`` imports (the most specific that exists)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()

    def add(target: str) -> None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != module:
            out.add(target)

    for node in _imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "wsurgery":
                    add(alias.name)
            continue
        if node.level:
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            origin = ".".join(base + ([node.module] if node.module else []))
        else:
            origin = node.module or ""
        if origin.split(".")[0] != "wsurgery":
            continue
        for alias in node.names:
            sub = f"{origin}.{alias.name}"
            add(sub if sub in known else origin)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imported(m, p, known) for m, p in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def upward(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for a in sorted(edges):
        for b in sorted(edges[a]):
            if layer_of(b) > layer_of(a) and (a, b) not in KNOWN_UPWARD:
                bad.append(f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})")
    return bad


def test_every_module_has_a_layer():
    for m in modules():
        layer_of(m)


def test_no_import_points_up_a_layer():
    bad = upward(graph())
    assert not bad, "imports pointing up a layer:\n" + "\n".join(bad)


def test_no_import_cycle():
    """No cycle (an edge allowed in KNOWN_UPWARD aside)."""
    edges = {a: {b for b in bs if (a, b) not in KNOWN_UPWARD} for a, bs in graph().items()}
    found = cycles(edges)
    shown = []
    for comp in found:
        inside = set(comp)
        inner = [f"  {a} -> {b}" for a in comp for b in sorted(edges[a] & inside)]
        shown.append(" / ".join(comp) + "\n" + "\n".join(inner))
    assert not found, "import cycles:\n" + "\n".join(shown)


def test_known_upward_edges_still_exist():
    """An allowance for an edge that is gone is stale: remove it."""
    edges = graph()
    stale = sorted(f"{a} -> {b}" for a, b in KNOWN_UPWARD if b not in edges.get(a, set()))
    assert not stale, "stale allowances in KNOWN_UPWARD: " + ", ".join(stale)


def test_the_checker_sees_upward_imports_and_cycles():
    """The checks themselves: an upward edge inside a function and a two-module cycle
    are found; one under TYPE_CHECKING is not an edge."""
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from wsurgery.cli import app\n"
        "def f():\n    from wsurgery import api\n"
    )
    found = {n.module for n in _imports(tree)}
    assert found == {"typing", "wsurgery"}
    assert upward({"wsurgery.model": {"wsurgery.api"}, "wsurgery.api": set()}) == [
        "wsurgery.model (base/model) imports wsurgery.api (api)"
    ]
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
