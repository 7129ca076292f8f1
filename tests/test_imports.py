"""The package's import graph, read from the source (no module is imported): no circles, and every floor imports
only downward. Imports inside function bodies count like top-level ones, so an import moved into a function to
dodge a circle fails here as the circle itself would."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from llmlab.cli import COMMANDS

PACKAGE = Path(__file__).resolve().parent.parent / "llmlab"


def module_name(path: Path) -> str:
    parts = ["llmlab", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The llmlab modules an import statement of ``module`` loads (``from . import x`` names module ``x``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
    base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
        if node.level else node.module or ""
    found = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    return sorted({m for m in found if m in MODULES})


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[module] = {target for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                         for target in imported(module, node) if target != module}
    return graph


GRAPH = import_graph()
STAGES = {f"llmlab.{module}" for module, _ in COMMANDS.values() if module.startswith("stages.")}
# ``llmlab defend`` trains the guard with the classify stage, as ``llmlab run`` does with every stage; the defenses
# themselves (llmlab.redteam.defenses) stay below the stages, so that ``llmlab eval`` may use them
ABOVE_STAGES = {m for m in MODULES if m in ("llmlab.cli", "llmlab.pipeline", "llmlab.redteam.defend")
                or m.startswith("llmlab.experiments")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first = last), or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_reader_finds_real_imports():
    assert "llmlab.stages.common" in GRAPH["llmlab.stages.sft"]
    assert "llmlab.chat" in GRAPH["llmlab.stages.sft"]               # from .. import chat
    assert STAGES >= {"llmlab.stages.sft", "llmlab.stages.dpo", "llmlab.stages.ppo", "llmlab.stages.reward"}


def test_finds_a_cycle_through_a_function_body_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " → ".join(cycle)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_imports_no_sibling_stage_nor_the_cli(stage):
    wrong = GRAPH[stage] & (STAGES | ABOVE_STAGES)
    assert not wrong, f"{stage} imports {sorted(wrong)}: shared code belongs in stages/common.py or lower"


def test_lower_floors_import_no_stage():
    """Models, data, training, inference and the world know nothing of the stages, the pipeline or the CLI."""
    upper = {m for m in MODULES if m.startswith("llmlab.stages.")} | ABOVE_STAGES
    for module, targets in GRAPH.items():
        if module in upper:
            continue
        assert not targets & upper, f"{module} imports {sorted(targets & upper)}"


@pytest.mark.parametrize("name", ["pretrain", "sft", "reward", "dpo", "ppo", "classify"])
def test_every_training_stage_has_one_entry_point(name):
    """``run(model, data, out, recipe=None, *, resume=False, ...)``, the recipe laid over the stage's DEFAULTS."""
    import importlib
    import inspect
    stage = importlib.import_module(f"llmlab.stages.{name}")
    params = inspect.signature(stage.run).parameters
    assert list(params)[:4] == (["models"] if name == "classify" else ["model_dir"]) + ["data_path", "out_dir",
                                                                                          "recipe"]
    assert params["recipe"].default is None and params["resume"].kind is inspect.Parameter.KEYWORD_ONLY
    assert isinstance(stage.DEFAULTS, dict) and callable(stage.register)
