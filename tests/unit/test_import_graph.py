"""The import graph of megatron_lomdm/ against the layer order of docs/design.md §10b.

    python tests/unit/test_import_graph.py [PACKAGE_DIR]     # the same check as a script

Every ``import`` of every module is read with ``ast``, function-level ones included (a lazy import
is still a dependency). The checks:

1. layering: a module imports only modules of its own layer or lower ones;
2. diffusion/ and losses/ import the standard library and torch only (pure math);
3. cycles: no cycle among folders and none among modules. Every cycle either contains an upward
   import (check 1 names it) or lies within one layer; this check reports the second kind, over
   the imports that are not upward. ``if TYPE_CHECKING:`` imports count for check 1 (a type is a
   dependency too) but not here: they never run, and they are how mutual references are typed;
4. the package root (``megatron_lomdm/__init__.py``) is no layer: it may import only modules whose
   module-level imports (and their packages' ``__init__``) are the standard library, so that
   ``import megatron_lomdm`` stays cheap and reaches no layer.

It is a ratchet. ``KNOWN_UPWARD`` and ``KNOWN_CYCLES`` list today's violations, each with the item of
issue 18 that removes it. A violation not listed fails; so does a listed one that is gone (delete
its line: the lists only shrink).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_lomdm"
NAME = "megatron_lomdm"

# docs/design.md §10b. A new folder must be added here (and there) before it may be imported.
LAYERS = {
    "config": 0, "utils": 0,
    "diffusion": 1,
    "losses": 2,
    "models": 3, "data": 3, "tracking": 3, "sampling": 3, "puzzles": 3,
    "distributed": 4,
    "training": 5, "checkpoint": 5,
    "apps": 6,
}
# Modules directly under megatron_lomdm/ (the root __init__ is check 4).
ROOT_MODULES = {"train": 6}  # `python -m megatron_lomdm.train`: the training entry opens a run for a user
PURE = {1: {"torch"}, 2: {"torch"}}  # layer -> third-party top-level packages it may import

# (importer, imported) -> the issue-18 item that removes it.
KNOWN_UPWARD: dict[tuple[str, str], str] = {
    # (item 3, sampling/generate.py -> training/evaluate.py -> apps/, is gone: generation and the
    # judges live in apps/generate.py and apps/judges.py; sampling/ is pure samplers.)
}
# Cycles among non-upward imports: ("folders" | "modules", members) -> the issue-18 item that removes it.
KNOWN_CYCLES: dict[tuple[str, frozenset[str]], str] = {
    # (items 2 and 3, the checkpoint <-> training folder cycle, is gone: the HF export, which builds
    # the model with training.build, lives in apps/hf_export.py and reads through the one reader.)
    # (item 4, data/'s blend <-> loader <-> shards <-> sources cycle, is gone: keep it that way.)
}


def module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: Path) -> dict[str, Path]:
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def folder(module: str) -> str:
    """``megatron_lomdm.data.loader`` -> ``data``; ``megatron_lomdm.train`` -> ``train``; the root -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer(module: str) -> int | None:
    name = folder(module)
    return LAYERS.get(name, ROOT_MODULES.get(name))


def _where(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> str:
    """``"module"`` (runs on import), ``"function"`` (runs when called) or ``"type"`` (never runs)."""
    where = "module"
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return "type"
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            where = "function"
    return where


def imports(module: str, path: Path, known: set[str]) -> list[tuple[str, str]]:
    """``(imported, where)`` for every import in ``path`` (``where``: see ``_where``): package modules
    by their full name (``from a import b`` is ``a.b`` when that is a module), anything else by its
    top-level name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        where = _where(node, parents)
        for name in names:
            if name.split(".")[0] == NAME:
                while name not in known and "." in name:  # `import megatron_lomdm.x.Y` of an attribute
                    name = name.rsplit(".", 1)[0]
            else:
                name = name.split(".")[0]
            out.append((name, where))
    return out


def graph(package: Path) -> tuple[dict[str, Path], dict[str, list[tuple[str, str]]]]:
    mods = modules(package)
    return mods, {m: imports(m, p, set(mods)) for m, p in mods.items()}


def _stdlib_only(module: str, edges: dict[str, list[tuple[str, str]]]) -> bool:
    """The module-level imports of ``module`` and of the packages above it are the standard library."""
    chain = [".".join(module.split(".")[:i]) for i in range(2, module.count(".") + 2)]
    return all(name in sys.stdlib_module_names for m in chain for name, where in edges.get(m, []) if where == "module")


def _sccs(nodes: set[str], adj: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one member (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(adj.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = set()
                    while True:
                        x = stack.pop()
                        on.discard(x)
                        comp.add(x)
                        if x == v:
                            break
                    if len(comp) > 1:
                        out.append(frozenset(comp))
            elif w not in index:
                index[w] = low[w] = len(index)
                stack.append(w)
                on.add(w)
                work.append((w, iter(sorted(adj.get(w, ())))))
            elif w in on:
                low[v] = min(low[v], index[w])
    return out


def violations(package: Path = PACKAGE) -> tuple[dict[tuple[str, str], str], dict[tuple[str, frozenset[str]], str]]:
    """``(upward, cycles)``: every violation found, each with what it is."""
    mods, edges = graph(package)
    upward: dict[tuple[str, str], str] = {}
    flat: dict[str, set[str]] = {}
    for src, targets in edges.items():
        if src != NAME and layer(src) is None:
            upward[(src, "?")] = f"{src}: folder {folder(src)!r} has no layer in LAYERS (docs/design.md §10b)"
            continue
        for dst, where in targets:
            if dst not in mods:
                if src != NAME and layer(src) in PURE and dst not in sys.stdlib_module_names | PURE[layer(src)]:
                    upward[(src, dst)] = f"{src} imports {dst}: layer {layer(src)} imports only stdlib and torch"
                continue
            if src == NAME:
                if not _stdlib_only(dst, edges):
                    upward[(src, dst)] = f"the package root imports {dst}, which imports more than the standard library"
            elif dst != NAME and layer(dst) is not None and layer(dst) > layer(src):
                upward[(src, dst)] = f"{src} (layer {layer(src)}) imports {dst} (layer {layer(dst)})"
            elif dst != src and dst != NAME and where != "type":
                flat.setdefault(src, set()).add(dst)
    cycles: dict[tuple[str, frozenset[str]], str] = {}
    for comp in _sccs(set(mods), flat):
        cycles[("modules", comp)] = "import cycle among modules: " + " <-> ".join(sorted(comp))
    folders: dict[str, set[str]] = {}
    for src, dsts in flat.items():
        folders.setdefault(folder(src), set()).update(folder(d) for d in dsts if folder(d) != folder(src))
    for comp in _sccs(set(folders), folders):
        cycles[("folders", comp)] = "import cycle among folders: " + " <-> ".join(sorted(comp))
    return upward, cycles


def problems(package: Path = PACKAGE) -> list[str]:
    upward, cycles = violations(package)
    out = [f"new: {why}" for key, why in sorted(upward.items()) if key not in KNOWN_UPWARD]
    out += [f"new: {why}" for key, why in sorted(cycles.items(), key=str) if key not in KNOWN_CYCLES]
    out += [f"gone (remove it from KNOWN_UPWARD): {a} -> {b}" for a, b in KNOWN_UPWARD if (a, b) not in upward]
    out += [f"gone (remove it from KNOWN_CYCLES): {kind} {sorted(members)}" for kind, members in KNOWN_CYCLES
            if (kind, members) not in cycles]
    return out


def test_layers_cover_the_package() -> None:
    """Every folder and root module of the package has a layer (a new folder needs one)."""
    found = {folder(m) for m in modules(PACKAGE)} - {""}
    assert found <= set(LAYERS) | set(ROOT_MODULES), sorted(found - set(LAYERS) - set(ROOT_MODULES))


def test_import_graph_matches_the_layer_order() -> None:
    """No new upward import or cycle, and every listed one still exists (docs/design.md §10b)."""
    found = problems()
    assert not found, "\n".join(["import graph vs docs/design.md §10b:", *found])


if __name__ == "__main__":
    root = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else PACKAGE
    listed = problems(root)
    print("\n".join(listed) or f"{root}: import graph OK")
    sys.exit(1 if listed else 0)
