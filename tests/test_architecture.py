"""The package's layering, checked on its source: imports run one way (docs/ARCHITECTURE.md), no cycles,
and function-level imports of hyperlora modules only for optional backends.

Reads every ``import`` statement of ``hyperlora/`` with ``ast`` (module level and inside functions), so a
cycle held apart by a function-level import is still a cycle here.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "hyperlora"

# Lowest first. A module may import its own layer or any lower one, never a higher one.
LAYERS = ["ops", "modeling", "adapters", "hypernets", "runtime", "decisions", "serving", "integrations", "tasks", "training", "evaluation", "cli"]
# Top-level modules and where they sit: the compiled extensions and small shared helpers are at the bottom.
ROOT_MODULES = {"hyperlora._C": "ops", "hyperlora._cpu": "ops", "hyperlora._io": "ops", "hyperlora.kernels": "ops"}
# Function-level imports of these (optional: Triton, the compiled extensions) are allowed, with a comment.
# The one exception: each CLI command imports its work inside run(), so `hyperlora --help` loads no torch.
CLI = "hyperlora.cli."
OPTIONAL_INTERNAL = ("hyperlora.kernels", "hyperlora._C", "hyperlora._cpu", "hyperlora.ops._cuda",
                     "hyperlora.ops._cpu_kernel")


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    line: int
    in_function: bool
    commented: bool


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _all_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(name: str, modules: set[str]) -> str:
    """The most specific existing module for a dotted import target (``a.b.c`` -> ``a.b`` if c is a name)."""
    while name and name not in modules and name not in ROOT_MODULES:
        name = name.rpartition(".")[0]
    return name


def _edges() -> list[Edge]:
    modules = _all_modules()
    names = set(modules)
    out: list[Edge] = []
    for mod, path in modules.items():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        is_pkg = path.name == "__init__.py"

        def visit(node: ast.AST, in_fn: bool) -> None:
            for ch in ast.iter_child_nodes(node):
                fn = in_fn or isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                targets: list[str] = []
                if isinstance(ch, ast.ImportFrom):
                    if ch.level:
                        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                        base = base[: len(base) - (ch.level - 1)]
                        origin = ".".join(base + ([ch.module] if ch.module else []))
                    else:
                        origin = ch.module or ""
                    targets = [f"{origin}.{a.name}" for a in ch.names]
                elif isinstance(ch, ast.Import):
                    targets = [a.name for a in ch.names]
                for t in targets:
                    if t == "hyperlora" or t.startswith("hyperlora."):
                        dst = _resolve(t, names)
                        near = " ".join(lines[max(0, ch.lineno - 2): ch.end_lineno or ch.lineno])
                        out.append(Edge(mod, dst, ch.lineno, fn, "#" in near))
                visit(ch, fn)

        visit(tree, False)
    return out


def _layer(mod: str) -> str | None:
    if mod in ROOT_MODULES:
        return ROOT_MODULES[mod]
    parts = mod.split(".")
    if len(parts) < 2:
        return None  # the package root (lazy names only) and __main__
    if parts[1] in LAYERS:
        return parts[1]
    return ROOT_MODULES.get(".".join(parts[:2]))


def test_every_module_has_a_layer():
    stray = [m for m in _all_modules() if _layer(m) is None and m not in ("hyperlora", "hyperlora.__main__")]
    assert not stray, f"modules outside the layers {LAYERS}: {stray} (place them in a subpackage)"


def test_imports_only_run_downward():
    bad = []
    for e in _edges():
        src, dst = _layer(e.src), _layer(e.dst)
        if src is None or dst is None or e.src == "hyperlora.__main__":
            continue
        if LAYERS.index(dst) > LAYERS.index(src):
            bad.append(f"{e.src}:{e.line} imports {e.dst} ({src} -> {dst})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def _cycles(edges: list[Edge]) -> list[list[str]]:
    graph: dict[str, set[str]] = {}
    for e in edges:
        if e.src != e.dst and e.dst != "hyperlora":
            graph.setdefault(e.src, set()).add(e.dst)
    # Tarjan's strongly connected components
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
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
                comps.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            strong(v)
    return comps


def test_no_import_cycles_function_level_imports_included():
    cycles = _cycles(_edges())
    assert not cycles, "import cycles (function-level imports included):\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_planted_cycle():
    planted = [Edge("hyperlora.a", "hyperlora.b", 1, False, False), Edge("hyperlora.b", "hyperlora.c", 1, True, False),
               Edge("hyperlora.c", "hyperlora.a", 1, True, False), Edge("hyperlora.c", "hyperlora.d", 1, False, False)]
    assert _cycles(planted) == [["hyperlora.a", "hyperlora.b", "hyperlora.c"]]


def test_function_level_internal_imports_are_optional_backends_with_a_comment():
    bad = [f"{e.src}:{e.line} imports {e.dst} inside a function"
           + ("" if e.dst.startswith(OPTIONAL_INTERNAL) else " (not an optional backend: import it at the top)")
           + ("" if e.commented else " without a comment saying why")
           for e in _edges() if e.in_function and e.src != "hyperlora.__main__" and not e.src.startswith(CLI)
           and not (e.dst.startswith(OPTIONAL_INTERNAL) and e.commented)]
    assert not bad, "function-level imports of hyperlora modules:\n" + "\n".join(bad)


def test_checkpoints_folder_holds_data_only():
    code = sorted(str(p.relative_to(PKG)) for p in (PKG / "checkpoints").rglob("*.py"))
    assert not code, f"hyperlora/checkpoints/ is data only; found code: {code}"


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_is_a_package(layer):
    assert (PKG / layer / "__init__.py").is_file()
