"""The layout shows the design: imports flow one way and harness/ has no import cycle.

Every import in harness/ counts, module-level or inside a function (a lazy import is still a
dependency), so the graph here is the program's real one."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "harness"

# Layers, lowest first: a module may import its own layer or lower ones, never a higher one.
LAYERS = [
    {"harness.errors", "harness.types", "harness.records", "harness.timing", "harness.config", "harness.suites",
     "harness.seeds", "harness.provenance"},
    {"harness.targets"},
    {"harness.drafters"},
    {"harness.engine"},
    {"harness.meter", "harness.training"},
    {"harness.reports"},
    {"harness.calibrate", "harness.selfspec_search"},
    {"harness.runner", "harness.distributed"},
    {"harness.profile"},
    {"harness.cli", "harness.run_cli", "harness.__main__", "harness"},
]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports() -> dict[str, set[str]]:
    """module -> harness modules it imports (resolved to existing modules)."""
    mods = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = [f"{node.module}.{a.name}" for a in node.names]
                targets = [t for t in subs if t in mods] or [node.module]  # `from pkg import module`
            for t in targets:
                if t in mods and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def layer_of(module: str) -> int:
    best = None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS"
    return best[0]


def test_no_import_cycle():
    assert find_cycle(imports()) is None, " -> ".join(find_cycle(imports()))


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_flow_one_way():
    upward = [(m, d) for m, deps in imports().items() for d in deps if layer_of(d) > layer_of(m)]
    assert not upward, "imports from a higher layer: " + ", ".join(f"{m} -> {d}" for m, d in upward)


def test_reports_read_records_only():
    for m, deps in imports().items():
        if m.startswith("harness.reports"):
            assert not [d for d in deps if d.startswith(("harness.engine", "harness.drafters", "harness.runner"))], m
