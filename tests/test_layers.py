"""The layer contract: every import in kvc/ and passes/ (function-level ones included) points
down the house, never up or sideways between independent rooms, and no module imports
itself back through a cycle. docs/ARCHITECTURE.md draws the same layers.

`passes/` is installed as `kvc.passes` (pyproject's package-dir), so it is read from its own
folder under that name; a relative import (`from .nodes import x`) resolves as Python would.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# bottom to top; modules in one row are independent of each other (neither imports the other)
LAYERS: list[tuple[str, ...]] = [
    ("kvc.errors", "kvc.version"),
    ("kvc.progress", "kvc.dtypes"),
    ("kvc.ir",),
    ("kvc.hardware",),
    ("kvc.config",),
    ("kvc.models",),
    ("kvc.passes",),
    ("kvc.compiler",),
    ("kvc.planner", "kvc.runtime"),
    ("kvc.profiler", "kvc.artifact", "kvc.tokenizer"),
    ("kvc.text",),  # a CompiledModel with a tokenizer: texts, chats, batches, stop strings
    ("kvc.api",),
    ("kvc",),  # the package's own facade: kvc.compile, kvc.load
    ("kvc.reports", "kvc.jobs"),  # reading artifacts and plans · JSONL batch jobs through a model
    ("kvc.cli",),
    ("kvc.__main__",),  # `python -m kvc` (torchrun's -m kvc): the CLI's entry, nothing else
]


def _module_files() -> dict[str, Path]:
    """Every module of the package by its dotted name (passes/ as kvc.passes)."""
    out = {}
    for base, pkg in ((ROOT / "kvc", "kvc"), (ROOT / "passes", "kvc.passes")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = path
    return out


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported kvc module, line) for every import statement anywhere in the file."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from kvc.ir import plan` imports kvc.ir.plan, `from kvc.ir.plan import Plan`
            # kvc.ir.plan: _resolve keeps the longest prefix that is a module
            out += [(f"{mod}.{a.name}", node.lineno) for a in node.names]
    return [(m, line) for m, line in out if m == "kvc" or m.startswith("kvc.")]


# rooms that must not import each other even where the rows would allow it: the runtime runs
# lowered graphs and a Plan, and knows neither how they were made nor how they were chosen
INDEPENDENT = [("kvc.runtime", ("kvc.passes", "kvc.compiler", "kvc.planner"))]


def _in(module: str, room: str) -> bool:
    return module == room or module.startswith(room + ".")


def layer_of(module: str) -> tuple[int, str] | None:
    """(row, room) of the most specific room a module belongs to."""
    best = None
    for row, rooms in enumerate(LAYERS):
        for room in rooms:
            if module == room or (room != "kvc" and module.startswith(room + ".")):
                if best is None or len(room) > len(best[1]):
                    best = (row, room)
    return best


def _resolve(target: str, modules: dict) -> str | None:
    """The kvc module an import names (`kvc.ir.plan.Plan` -> `kvc.ir.plan`)."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def violations(modules: dict[str, Path] | None = None) -> list[str]:
    modules = modules or _module_files()
    out = []
    for name, path in sorted(modules.items()):
        mine = layer_of(name)
        if mine is None:
            out.append(f"{path}: module {name} is in no layer of tests/test_layers.py")
            continue
        for target, line in _imports(name, path):
            target = _resolve(target, modules)
            theirs = layer_of(target) if target else None
            if theirs is None or target == name:
                continue
            where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            if theirs[0] > mine[0] or (theirs[0] == mine[0] and theirs[1] != mine[1]):
                out.append(f"{where}:{line}: {name} ({mine[1]}) imports "
                           f"{target} ({theirs[1]}), which is not below it")
            for a, others in INDEPENDENT:
                for b in others:
                    if (_in(name, a) and _in(target, b)) or (_in(name, b) and _in(target, a)):
                        out.append(f"{where}:{line}: {name} imports {target}: {a} and {b} "
                                   "are independent")
    return out


def cycles(modules: dict[str, Path] | None = None) -> list[list[str]]:
    """Module-level import cycles (function-level imports included), by Tarjan's algorithm."""
    modules = modules or _module_files()
    graph = {n: sorted({t for t in (_resolve(m, modules) for m, _ in _imports(n, p))
                        if t and t != n and not n.startswith(t + ".")})
             for n, p in modules.items()}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_import_points_down_the_layers():
    found = violations()
    assert not found, "upward or sideways imports:\n" + "\n".join(found)


def test_no_import_cycles():
    assert cycles() == []


def test_the_contract_catches_an_upward_import(tmp_path):
    """A runtime module that imports the planner (even inside a function) is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from kvc.planner.scheduler import make_plan\n")
    modules = {**_module_files(), "kvc.runtime.bad": bad}
    assert any("kvc.runtime.bad" in v and "kvc.planner" in v for v in violations(modules))
    relative = tmp_path / "rel.py"
    relative.write_text("from ..runtime import executor\n")  # a pass reaching into the runtime
    modules = {**_module_files(), "kvc.passes.rel": relative}
    assert any("kvc.passes.rel" in v for v in violations(modules))
    sideways = tmp_path / "side.py"
    sideways.write_text("import kvc.runtime.executor\n")  # the compiler reaching into the runtime
    modules = {**_module_files(), "kvc.compiler.side": sideways}
    assert any("independent" in v for v in violations(modules))


@pytest.mark.parametrize("module", ["kvc.ir.plan", "kvc.passes.streams", "kvc.runtime.executor"])
def test_every_module_is_placed(module):
    assert layer_of(module) is not None
