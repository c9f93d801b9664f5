"""The seams between modules, checked on the source (AST), as the layering test checks imports.

- A `Run` is a record: outside `engine/records/run.py` (the record) and `engine/training/pipeline.py` (the
  pipeline, which owns the training session) nothing reads or writes its underscore attributes; the magics,
  widgets and the rest of the engine use its public surface.
- The engine imports without cycles (lazy imports count; `TYPE_CHECKING` ones do not).
- The engine names no method: what a method can do is asked of the method.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nbtune"
RECORD = PACKAGE / "engine" / "records" / "run.py"
OWNERS = {RECORD, PACKAGE / "engine" / "training" / "pipeline.py", PACKAGE / "engine" / "training" / "session.py"}


def _run_private_names() -> set[str]:
    """Underscore attributes the `Run` class sets or defines (its private state and helpers)."""
    tree = ast.parse(RECORD.read_text())
    run_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Run")
    names = {n.name for n in run_class.body if isinstance(n, ast.FunctionDef)}
    names |= {n.attr for n in ast.walk(run_class) if isinstance(n, ast.Attribute)
              and isinstance(n.value, ast.Name) and n.value.id == "self"}
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def _private_uses(path: Path, names: set[str]) -> list[str]:
    """`something._name` for `name` in `names`, where `something` is not `self` (a class's own state)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [f"{path.name}:{node.lineno} .{node.attr}" for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr in names
            and not (isinstance(node.value, ast.Name) and node.value.id == "self")]


def test_the_run_has_private_state_to_protect():
    assert {"_session", "_status", "_observers", "_stop", "_thread"} <= _run_private_names()


def test_only_the_record_and_the_pipeline_touch_a_runs_private_state():
    names = _run_private_names()
    uses = [use for path in sorted(PACKAGE.rglob("*.py")) if path not in OWNERS for use in _private_uses(path, names)]
    assert not uses, "use the Run's public surface (or a function of the pipeline) instead:\n" + "\n".join(uses)


def test_the_private_state_rule_catches_a_violation(tmp_path):
    bad = tmp_path / "magic.py"
    bad.write_text("def show(run):\n    run._observers.observers.append(1)\n    return self._observers\n")
    assert _private_uses(bad, {"_observers"}) == ["magic.py:2 ._observers"]


def _runtime_imports(path: Path) -> set[str]:
    """nbtune modules `path` imports when it runs (in-function imports too, `if TYPE_CHECKING:` ones not)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    typing_only = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for inner in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("nbtune")}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _engine_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in (PACKAGE / "engine").rglob("*.py") if p.name != "__init__.py"}
    return {name: {m for m in _runtime_imports(path) if m in modules and m != name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (as a path that returns to its start), or None."""
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*trail[trail.index(nxt):], nxt] if nxt in trail else [node, nxt]
            if nxt not in state:
                found = visit(nxt, [*trail, nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_engine_imports_without_cycles():
    graph = _engine_graph()
    assert "nbtune.engine.training.pipeline" not in graph["nbtune.engine.records.run"]  # the record calls no pipeline
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _compared_literals(source: str) -> list[tuple[int, str]]:
    """String literals a comparison tests against (`x == "lora"`, `x in ("lora", "dora")`): naming a
    method to branch on it. A column called "prompt" or a message that says "dora" is not a branch."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                items = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                found += [(node.lineno, item.value) for item in items
                          if isinstance(item, ast.Constant) and isinstance(item.value, str)]
    return found


def test_the_method_name_rule_catches_a_branch():
    assert _compared_literals("if config.method in ('lora', 'dora'):\n    pass\nx = {'prompt': 1}") == [
        (1, "lora"), (1, "dora")]


@pytest.mark.parametrize("path", sorted((PACKAGE / "engine").rglob("*.py")), ids=lambda p: p.name)
def test_the_engine_names_no_method(path):
    from nbtune.methods.registry import all_methods

    names = {spec.name for spec in all_methods()}
    named = [f"{path.name}:{line} {value!r}" for line, value in _compared_literals(path.read_text()) if value in names]
    assert not named, "ask the method (MethodSpec) what it can do instead of naming it: " + ", ".join(named)


def test_the_pipeline_trains_through_the_runs_objective(llama_base, demo_rows, monkeypatch):
    """Another objective is one more class in objectives/registry.py: the pipeline asks it to tokenise and for
    its Trainer, and names nothing else."""
    import nbtune
    from nbtune.objectives import registry as objectives

    calls = []

    class Counting(objectives.SupervisedFineTuning):
        def tokenize(self, *args, **kwargs):
            calls.append("tokenize")
            return super().tokenize(*args, **kwargs)

        def trainer(self, *args, **kwargs):
            calls.append("trainer")
            return super().trainer(*args, **kwargs)

    monkeypatch.setitem(objectives.OBJECTIVES, "sft", Counting())
    run = nbtune.finetune(data=demo_rows, base=llama_base, steps=1, batch_size=4, metric="none", save=False)
    assert run.status == "finished" and calls == ["tokenize", "trainer"]
