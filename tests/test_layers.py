"""The package's import graph: layers point down and no module imports itself in a circle."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).parent.parent / "msad_jax"

# The bottom layer and the modules it may use besides itself.
LOWER = ("msad_jax.models", "msad_jax.losses", "msad_jax.knn", "msad_jax.metrics", "msad_jax.data")
BASE = ("msad_jax.errors", "msad_jax.preprocessing", "msad_jax.digest")
INFERENCE = ("msad_jax.detector", "msad_jax.export", "msad_jax.score")
TRAINING = (
    "msad_jax.train",
    "msad_jax.train_step",
    "msad_jax.optimizer",
    "msad_jax.run_setup",
    "msad_jax.run_outputs",
    "msad_jax.metric_writer",
    "msad_jax.plots",
    "msad_jax.main",
    "msad_jax.notebook_utils",
    "msad_jax.analysis",
)


def _modules() -> dict[str, pathlib.Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(modules: dict[str, pathlib.Path]) -> dict[str, set[tuple[str, bool]]]:
    """``{module: {(imported package module, at module level?)}}``."""

    def resolve(name: str) -> str:
        while name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                if target.startswith("msad_jax.") or target == "msad_jax":
                    found.add((resolve(target), node.col_offset == 0))
        graph[name] = {(target, top) for target, top in found if target != name}
    return graph


GRAPH = _imports(_modules())


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_graph_sees_known_imports():
    # The parser itself could miss imports; these edges are in the sources.
    assert ("msad_jax.run_setup", True) in GRAPH["msad_jax.train"]
    assert ("msad_jax.export", False) in GRAPH["msad_jax.detector"]
    assert any(target.startswith("msad_jax.models") for target, _ in GRAPH["msad_jax.detector"])


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _within(m, LOWER)))
def test_models_losses_knn_metrics_and_data_import_nothing_above_them(module):
    above = sorted(t for t, _ in GRAPH[module] if t != "msad_jax" and not _within(t, LOWER + BASE))
    assert above == [], f"{module} imports {above}"


def test_inference_reaches_no_training_code_even_lazily():
    reached, todo = set(), list(INFERENCE)
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(target for target, _ in GRAPH[module])
    assert sorted(m for m in reached if _within(m, TRAINING)) == []


def test_no_import_circle_at_module_level():
    graph = {m: {t for t, top in targets if top} for m, targets in GRAPH.items()}
    finished: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            pytest.fail("import circle: " + " -> ".join(path[path.index(module) :] + [module]))
        if module in finished:
            return
        for target in sorted(graph[module]):
            visit(target, path + [module])
        finished.add(module)

    for module in sorted(graph):
        visit(module, [])
