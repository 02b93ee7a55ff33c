"""Imports go one way: no cycle among core's modules (static graph of every import, lazy ones included), and every
module imports on its own (in a fresh interpreter, no other core module loaded before it)."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "core"

def core_modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(CORE.rglob("*.py")):
        rel = path.relative_to(CORE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        pkg = module.split(".") if is_pkg else module.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([node.module] if node.module else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def import_graph(lazy: bool = True) -> dict[str, set[str]]:
    """module -> core modules it imports (module level only when lazy=False)."""
    mods = core_modules()
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        nodes = ast.walk(tree) if lazy else [n for n in tree.body]
        targets = set()
        for node in nodes:
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                targets.update(_resolve(name, path.name == "__init__.py", node))
        # a module's own ancestor packages are initialized before it anyway: `from . import x` adds no edge
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        graph[name] = {t for t in targets if t in mods and t != name and t not in ancestors}
    return graph


def cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), set(), [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                out.add(tuple(sorted(comp)))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_module_level_imports_have_no_cycle():
    assert cycles(import_graph(lazy=False)) == set()


def test_no_import_cycle_even_through_lazy_imports():
    """Function-level imports included, with no allow-list: a lazy import may defer a heavy or optional dependency,
    never hide a cycle."""
    assert cycles(import_graph(lazy=True)) == set()


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {("a", "b", "c")}


def test_every_core_module_imports_on_its_own():
    """One interpreter (torch and transformers load once); before each module every core module is dropped from
    sys.modules, so each import starts from nothing of core, as it would in a fresh process."""
    names = [n for n in core_modules() if not n.endswith("__main__")]
    script = (
        "import importlib, json, sys, traceback\n"
        f"names = {names!r}\n"
        "bad = {}\n"
        "for n in names:\n"
        "    for k in [k for k in sys.modules if k == 'core' or k.startswith('core.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(n)\n"
        "    except Exception as e:\n"
        "        bad[n] = f'{type(e).__name__}: {e}'\n"
        "print(json.dumps(bad))\n"
    )
    res = subprocess.run([sys.executable, "-c", script], cwd=CORE.parent, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {}
