"""The layout stays as designed: dependencies point one way (no import cycles, no module imports an
entry point), every module opens with a docstring naming its job, and files and functions stay short."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {"training", "test", "bench"}
MAX_FUNCTION_LINES = 80  # lines of code, the docstring not counted
MAX_MODULE_LINES = 600


def parsed_modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text(), str(path)) for path in sorted(ROOT.glob("*.py"))}


def import_graph(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    """Each top-level module and the project modules it imports (anywhere in its code)."""
    graph = {}
    for name, tree in modules.items():
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
        graph[name] = imported & modules.keys() - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as ``[a, b, ..., a]``, or [] when the graph has none (depth-first search)."""
    state: dict[str, str] = {}  # "active" on the current path, "done" once all below it are searched
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "active"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "active":
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = "done"
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_find_cycle_finds_cycles_and_only_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_dependencies_point_one_way():
    graph = import_graph(parsed_modules())
    assert {"training", "test", "bench", "model", "dataset", "step"} <= graph.keys()
    assert find_cycle(graph) == []
    assert {name: sorted(imported & ENTRY_POINTS) for name, imported in graph.items() if imported & ENTRY_POINTS} == {}
    assert graph["model"] == set(), "model.py is the network alone"


def test_every_module_names_its_job_first():
    for name, tree in parsed_modules().items():
        docstring = ast.get_docstring(tree)
        assert docstring and len(docstring.splitlines()[0]) > 20, f"{name}.py: no opening docstring line naming its job"


def test_files_and_functions_stay_short():
    long_functions = []
    for name, tree in parsed_modules().items():
        assert len((ROOT / f"{name}.py").read_text().splitlines()) <= MAX_MODULE_LINES, f"{name}.py is over {MAX_MODULE_LINES} lines: split off a job"
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if ast.get_docstring(node) is not None:
                    lines -= node.body[0].end_lineno - node.body[0].lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.py:{node.name} ({lines} lines)")
    assert long_functions == []
