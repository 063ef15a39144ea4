"""Architecture checks: no import cycles in ``cowenv/``, the kernel stays a pure library."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "cowenv"


def import_graph(pkg: Path = PKG) -> dict[str, set[str]]:
    """Module -> modules of the package it imports (any import, TYPE_CHECKING ones too)."""
    mods: dict[str, Path] = {}
    for p in pkg.rglob("*.py"):
        parts = p.relative_to(pkg.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg_name = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg_name.split(".")[: len(pkg_name.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                cands = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                cands = [a.name for a in node.names]
            else:
                continue
            edges[m] |= {c for c in cands if c in mods and c != m}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
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


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_cycle_finder_finds_a_planted_cycle(tmp_path):
    pkg = tmp_path / "cowenv"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\n"
                                      "if TYPE_CHECKING:\n    from ..a import x\n")
    assert cycles(import_graph(pkg)) == [["cowenv.a", "cowenv.sub.b"]]


def test_kernel_package_is_a_pure_simulation_library():
    """``cowenv.kernel`` imports nothing of gymnasium, the env, agents or the harness."""
    edges = import_graph()
    for m, deps in edges.items():
        if m.startswith("cowenv.kernel"):
            outside = {d for d in deps if not d.startswith("cowenv.kernel")}
            assert not outside, f"{m} imports {sorted(outside)}"
        if m.startswith("cowenv.kernel."):
            src = (PKG.parent / (m.replace(".", "/") + ".py")).read_text()
            assert "gymnasium" not in src, m
