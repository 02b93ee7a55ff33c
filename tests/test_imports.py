"""Imports go one way: no cycle among core's modules (static graph of every import, lazy ones included), every
module imports on its own (in a fresh interpreter, no other core module loaded before it), and no module of the
engine or the GUI uses another module's private (_underscored) names."""
import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "core"

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


def private_uses(path: Path, module: str) -> list[str]:
    """`from <project module> import _name` and `<imported project module>._name` in one file (dunders allowed)."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    private = lambda name: name.startswith("_") and not name.startswith("__")  # noqa: E731
    bound, out = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_pkg, node)[0]
            if base.split(".")[0] not in ("core", "flatgui"):
                continue
            for a in node.names:
                if private(a.name):
                    out.append(f"{path.name}:{node.lineno}: from {base} import {a.name}")
                bound.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names
                         if a.name.split(".")[0] in ("core", "flatgui"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr) and isinstance(node.value, ast.Name) \
                and node.value.id in bound:
            out.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    return out


def test_no_private_names_across_modules():
    files = sorted(CORE.rglob("*.py")) + sorted((ROOT / "flatgui").rglob("*.py")) + [ROOT / "app.py"]
    found = []
    for path in files:
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)[:-1] if rel.name == "__init__" else list(rel.parts)
        found += private_uses(path, ".".join(parts))
    assert found == []


def test_private_name_check_finds_both_forms(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text("from .flat import _hidden, public\nfrom . import kernels\nkernels._loaded\npublic._x\n")
    assert len(private_uses(src, "core.mod")) == 3


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
