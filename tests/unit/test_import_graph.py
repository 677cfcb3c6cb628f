"""The import graph of ``megatron_md``: no cycle, and every package imports only the layers below it.

Edges come from the source (``ast``), not from running it: every ``import`` / ``from … import``
anywhere in a module counts, module-level and inside functions alike (a function-level import
is still a dependency: it only runs later). ``from pkg import name`` is an edge to ``pkg.name``
when that is a module, else to ``pkg``. Importing ``a.b.c`` also initialises the packages ``a.b``
and ``a``, so those count as edges too — except the importer's own enclosing packages, which
Python has already started to initialise before the importer runs (a submodule importing from its
own package is not a cycle at run time).
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: docs/design.md's layers, lowest first: a package may import its own layer's modules and the
#: layers below, never one above
LAYERS = [
    {"errors"},
    {"ops"},
    {"shard"},
    {"optim", "telemetry"},
    {"megatron"},
    {"checkpoint"},
    {"training"},
    {"experiments", "megatron_lm", "planning", "testing"},
]


def import_graph(root: Path, package: str) -> dict[str, dict[str, tuple[Path, int]]]:
    """``{module: {imported module: (file, line)}}`` over the modules of ``root/package``."""
    mods: dict[str, tuple[Path, bool]] = {}
    for p in sorted((root / package).rglob("*.py")):
        parts = list(p.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)

    def known(name: str):
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in mods else None

    graph: dict[str, dict[str, tuple[Path, int]]] = {m: {} for m in mods}
    for m, (path, is_pkg) in mods.items():
        here = m if is_pkg else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[:len(here.split(".")) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]
            else:
                continue
            own = {".".join(m.split(".")[:i]) for i in range(1, m.count(".") + 1)} | {m}
            for t in targets:
                t = known(t)
                if t is None:
                    continue
                parents = {".".join(t.split(".")[:i]) for i in range(1, t.count(".") + 1)}
                for dep in {t} | parents:
                    if dep not in own and dep in mods:
                        graph[m].setdefault(dep, (path, node.lineno))
    return graph


def cycles(graph: dict[str, dict]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(graph[w])))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def _describe(graph, comp) -> str:
    return "\n".join(f"  {a} -> {b}  ({p.relative_to(p.parents[2]) if len(p.parents) > 2 else p}:{line})"
                     for a in comp for b, (p, line) in sorted(graph[a].items()) if b in comp)


def test_megatron_md_has_no_import_cycle():
    graph = import_graph(REPO, "megatron_md")
    assert len(graph) > 40 and sum(map(len, graph.values())) > 100  # the walk saw the package
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n\n".join(_describe(graph, c) for c in found)


def test_packages_import_only_lower_layers():
    graph = import_graph(REPO, "megatron_md")
    rank = {name: i for i, layer in enumerate(LAYERS) for name in layer}

    def layer(module: str):
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else None   # None: megatron_md/__init__.py itself

    unplaced = sorted({layer(m) for m in graph} - set(rank) - {None})
    assert not unplaced, f"add these to LAYERS (and to docs/design.md): {unplaced}"
    bad = [f"  {a} -> {b}  ({p.name}:{line})" for a, deps in graph.items() for b, (p, line) in deps.items()
           if layer(a) and layer(b) and layer(a) != layer(b) and rank[layer(b)] > rank[layer(a)]]
    assert not bad, "imports of a higher layer:\n" + "\n".join(bad)


def test_the_walk_finds_cycles_through_function_level_and_package_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import os\n\ndef f():\n    from .sub import thing\n")   # inside a function
    (pkg / "sub" / "__init__.py").write_text("from .inner import thing\n")         # the package re-exports
    (pkg / "sub" / "inner.py").write_text("from ..a import f\nthing = 1\n")
    (pkg / "b.py").write_text("from . import a\n")                                   # not in the cycle
    graph = import_graph(tmp_path, "pkg")
    assert cycles(graph) == [["pkg.a", "pkg.sub", "pkg.sub.inner"]]
    assert "pkg.a" in graph["pkg.b"] and graph["pkg.a"]["pkg.sub"][1] == 4
    # a submodule importing from its own package is no cycle
    (pkg / "sub" / "inner.py").write_text("from . import other\nthing = 1\n")
    (pkg / "sub" / "other.py").write_text("")
    assert cycles(import_graph(tmp_path, "pkg")) == []


def test_layers_are_the_design_docs():
    design = (REPO / "docs" / "design.md").read_text()
    present = {p.stem if p.suffix else p.name for p in (REPO / "megatron_md").iterdir()
               if p.suffix == ".py" or (p / "__init__.py").exists()}
    for name in sorted(set().union(*LAYERS) & present):
        assert f"megatron_md/{name}" in design, f"docs/design.md does not describe megatron_md/{name}"
