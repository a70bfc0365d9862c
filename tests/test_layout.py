"""The layout stays as designed: the entry points and the brief's modules on top, the library in one package,
dependencies pointing one way (no import cycles, no module imports an entry point), every module opening with
a docstring naming its job, short files and functions, and settings read as typed sections, never by string."""

import ast
import dataclasses
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "segmentation"
ENTRY_POINTS = {"training", "test", "bench"}
TOP_MODULES = ENTRY_POINTS | {"model", "dataset", "losses"}
COMMANDS = ENTRY_POINTS | {"dataset"}  # the modules a user runs: python dataset.py download|check
# scripts that bench.py --peers runs with a peer's own Python (nnU-Net's, StarDist's), never imported here
PEER_RUNNERS = {"segmentation.benchmarks.peer_nnunet", "segmentation.benchmarks.peer_stardist"}
SECTIONS = {"unet", "train", "predict", "augment", "overfit_one_batch"}
MAX_FUNCTION_LINES = 80  # lines of code, the docstring not counted
MAX_MODULE_LINES = 600
TRAINING_LINES, TRAINING_FUNCTION_LINES = 430, 60  # training.py: a loop read in a sitting, with room for features
MAX_SETTINGS_FIELDS = 30  # a settings dataclass holds one job's keys


def module_files() -> dict[str, Path]:
    """``{dotted name: path}`` of the modules on top and in the package (its ``__init__`` files included)."""
    found = {path.stem: path for path in sorted(ROOT.glob("*.py"))}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def parsed_modules() -> dict[str, ast.Module]:
    return {name: ast.parse(path.read_text(), str(path)) for name, path in module_files().items()}


def owner(name: str, known) -> str | None:
    """The longest known module that the dotted import ``name`` falls in, or None (not the project's)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return ".".join(parts[:end])
    return None


def import_graph(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    """Each module and the project modules it imports (anywhere in its code). ``from package import module``
    counts as importing the module; a package's ``__init__`` is not counted as imported by its modules."""
    graph = {}
    for name, tree in modules.items():
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported |= {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {found for item in imported if (found := owner(item, modules))} - {name}
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


def test_import_graph_resolves_package_imports():
    modules = {
        name: ast.parse(text)
        for name, text in {
            "top": "from pkg.sub import leaf\nimport pkg.other",
            "pkg": "",
            "pkg.sub": "",
            "pkg.sub.leaf": "from pkg.sub.leaf2 import thing",
            "pkg.sub.leaf2": "",
            "pkg.other": "",
        }.items()
    }
    graph = import_graph(modules)
    assert graph["top"] == {"pkg.sub.leaf", "pkg.other"}
    assert graph["pkg.sub.leaf"] == {"pkg.sub.leaf2"}


def test_the_top_holds_the_entry_points_and_the_brief_modules_only():
    assert {path.stem for path in ROOT.glob("*.py")} == TOP_MODULES
    packages = [path.parent.name for path in ROOT.glob("*/__init__.py")]
    assert packages == [PACKAGE]


def test_dependencies_point_one_way():
    graph = import_graph(parsed_modules())
    assert {"training", "test", "bench", "model", "dataset", f"{PACKAGE}.engine.step"} <= graph.keys()
    assert find_cycle(graph) == []
    assert {name: sorted(imported & ENTRY_POINTS) for name, imported in graph.items() if imported & ENTRY_POINTS} == {}
    assert graph["model"] == set(), "model.py is the network alone"


def test_only_the_commands_have_a_main_block():
    with_main = set()
    for name, tree in parsed_modules().items():
        for node in tree.body:
            if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
                with_main.add(name)
    assert with_main == COMMANDS | PEER_RUNNERS


def test_every_module_names_its_job_first():
    for name, tree in parsed_modules().items():
        docstring = ast.get_docstring(tree)
        assert docstring and len(docstring.splitlines()[0]) > 20, f"{name}: no opening docstring line naming its job"


def function_lengths(tree: ast.Module) -> dict[str, int]:
    """Each function's lines of code, its docstring not counted."""
    lengths = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if ast.get_docstring(node) is not None:
                lines -= node.body[0].end_lineno - node.body[0].lineno + 1
            lengths[node.name] = lines
    return lengths


def test_files_and_functions_stay_short():
    long_functions = []
    for name, path in module_files().items():
        assert len(path.read_text().splitlines()) <= MAX_MODULE_LINES, f"{name} is over {MAX_MODULE_LINES} lines"
        lengths = function_lengths(ast.parse(path.read_text()))
        long_functions += [
            f"{name}:{function} ({lines} lines)" for function, lines in lengths.items() if lines > MAX_FUNCTION_LINES
        ]
    assert long_functions == []


def test_the_training_script_has_room():
    path = module_files()["training"]
    assert len(path.read_text().splitlines()) <= TRAINING_LINES
    lengths = function_lengths(ast.parse(path.read_text()))
    assert {name: lines for name, lines in lengths.items() if lines > TRAINING_FUNCTION_LINES} == {}


def test_settings_sections_hold_one_job_each():
    import segmentation.settings as settings

    sizes = {
        name: len(dataclasses.fields(value))
        for name, value in vars(settings).items()
        if dataclasses.is_dataclass(value) and name.endswith("Settings")
    }
    assert len(sizes) == 7 and max(sizes.values()) <= MAX_SETTINGS_FIELDS, sizes


def calls_named(tree: ast.Module, names: set[str]) -> list[str]:
    """The calls of ``names`` (``Predictor(...)``, ``Predictor.from_plan(...)``) in a module, as text."""
    return [
        ast.unparse(node.func)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and ast.unparse(node.func) in names
    ]


def test_one_way_from_a_checkpoint_back_to_a_predictor():
    """Predictors are made in segmentation/inference (``trained.load_trained`` for checkpoints); outside it
    only training makes one, for the model it trains."""
    outside = {
        name: found
        for name, tree in parsed_modules().items()
        if not name.startswith(f"{PACKAGE}.inference")
        and (found := calls_named(tree, {"Predictor", "Predictor.from_plan"}))
    }
    assert outside == {"training": ["Predictor.from_plan"]}


def test_the_data_layer_receives_data_settings_only():
    found = {}
    for name, tree in parsed_modules().items():
        if name == "dataset" or name.startswith(f"{PACKAGE}.data"):
            names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
            names |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
            if wrong := names & {"TrainSettings", "RunSettings", "OverfitSettings"}:
                found[name] = sorted(wrong)
    assert found == {}


def test_run_state_is_read_by_name():
    """``progress`` is a dataclass: no ``progress["epoch"]`` below the checkpoints' plain data."""
    lookups = {
        name: [
            ast.unparse(node)
            for node in ast.walk(tree)
            if isinstance(node, ast.Subscript)
            and "progress" in ast.unparse(node.value)
            and isinstance(node.slice, ast.Constant)
            and node.slice.value != "progress"
        ]
        for name, tree in parsed_modules().items()
    }
    assert {name: found for name, found in lookups.items() if found} == {}


def section_lookups(tree: ast.Module) -> list[str]:
    """Subscripts by a config section's name (``config["train"]``, ``settings["predict"]``), line by line."""
    return [
        f"line {node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value in SECTIONS
    ]


def test_section_lookups_are_found():
    assert section_lookups(ast.parse('x = config["train"]["lr"]\ny = row["epoch"]')) == ["line 1: config['train']"]


def test_no_module_reads_the_config_by_its_keys():
    """The config is resolved once into typed settings (segmentation.config); below the entry points and
    in them, sections are attributes. Only config.py handles the plain data of YAML files and checkpoints."""
    found = {
        name: lookups
        for name, tree in parsed_modules().items()
        if name != f"{PACKAGE}.config" and (lookups := section_lookups(tree))
    }
    assert found == {}
