"""Imports only go down: no domain folder imports another that imports it back, no cycles."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "synth_xray_assets"
ENTRY_POINTS = {"definitions", "demo"}


def unit_of(module: str) -> str:
    """``synth_xray_assets.dreambooth.training`` -> ``dreambooth``; ``...settings`` -> ``settings``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Unit -> the units it imports (any import anywhere in its files, function bodies included)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        unit = unit_of(module)
        graph.setdefault(unit, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.startswith(package.name + ".") and unit_of(name) != unit:
                    graph[unit].add(unit_of(name))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [node, nxt] if nxt in stack else [node, nxt]
            if nxt not in state and (found := visit(nxt, stack + [node])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [])):
            return found
    return None


def domains() -> set[str]:
    return {p.name for p in PACKAGE.iterdir() if (p / "assets.py").is_file()}


def test_no_two_domains_import_each_other():
    graph = import_graph()
    both_ways = sorted(
        (a, b) for a in domains() for b in domains() if a < b and b in graph[a] and a in graph[b]
    )
    assert not both_ways, f"domain folders importing each other: {both_ways}"


def test_the_import_graph_has_no_cycles():
    assert find_cycle(import_graph()) is None, f"import cycle: {find_cycle(import_graph())}"


def test_shared_modules_import_no_domain_and_nothing_imports_the_entry_points():
    graph = import_graph()
    for unit, imported in graph.items():
        if unit not in domains() | ENTRY_POINTS:
            assert not imported & domains(), f"shared {unit} imports domains {imported & domains()}"
        if unit != "demo":
            assert not imported & ENTRY_POINTS, f"{unit} imports an entry point: {imported & ENTRY_POINTS}"


def test_the_checks_find_a_cycle_and_a_two_way_import(tmp_path):
    pkg = tmp_path / "synth_xray_assets"
    for name, body in {
        "a/assets.py": "from synth_xray_assets.b import x\n",
        "b/assets.py": "def f():\n    import synth_xray_assets.c.y\n",
        "c/y.py": "from synth_xray_assets.a.assets import z\n",
        "b/x.py": "",
    }.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(body)
    graph = import_graph(pkg)
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    graph["b"].add("a")
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
