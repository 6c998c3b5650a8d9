"""The package's import graph has no circles, and production code never imports `kd_teacher.testing`.

Read from the source with `ast` (every `import` statement, also those inside functions: a lazy import is still
a dependency, it only hides the circle until the call)."""

import ast
from pathlib import Path

import kd_teacher

PACKAGE = Path(kd_teacher.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """The package modules `name` imports: `from a.b import c` is a.b.c where that is a module, else a.b."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_reads_real_edges():
    graph = _graph()
    assert "kd_teacher.payload" in graph["kd_teacher.engine.engine"]
    assert "kd_teacher.topk" in graph["kd_teacher.payload"]  # a lazy import inside a function counts


def test_the_package_has_no_import_circles():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_production_code_never_imports_the_test_support_package():
    offenders = {name: sorted(t for t in targets if t.startswith("kd_teacher.testing"))
                 for name, targets in _graph().items() if not name.startswith("kd_teacher.testing")}
    assert {name: t for name, t in offenders.items() if t} == {}


def test_the_base_layer_imports_nothing_from_the_engine():
    base = ["kd_teacher.payload", "kd_teacher.topk", "kd_teacher.precision", "kd_teacher.config"]
    graph = _graph()
    for name in base:
        assert not any(t.startswith("kd_teacher.engine") for t in graph[name]), (name, graph[name])
