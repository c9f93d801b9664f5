"""The seams between modules, checked on the source (AST), as the layering test checks imports.

- A `Run` is a record: outside `engine/records/run.py` (the record) and `engine/training/pipeline.py` and
  `session.py` (the pipeline, which owns the training session) nothing reads or writes its underscore
  attributes; the magics, widgets and the rest of the engine use its public surface.
- The whole package imports without cycles (lazy imports count; `TYPE_CHECKING` ones do not), the methods'
  registration by import the one documented exception; the engine and the layers below it import no views,
  magics or api.
- The engine names no method: what a method can do is asked of the method.
- No module names an objective outside the objective's own file (nbtune/objectives/<name>.py): the config,
  data, engine, preview, panel and compare ask its `ObjectiveSpec`.
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


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_graph() -> dict[str, set[str]]:
    """Every nbtune module -> the nbtune modules it imports when it runs (lazy imports too); `from package
    import module` counts the module, not the package's `__init__`."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
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
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                          for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The import cycles of `graph`: its strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            members = set()
            while True:
                member = stack.pop()
                members.add(member)
                if member == node:
                    break
            if len(members) > 1:
                found.append(members)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _registration_by_import(members: set[str]) -> bool:
    """The one documented exception: the method registry imports the built-in method modules when it is first
    asked (lazily: they import peft, which `import nbtune` must not pay), and they import the registry to
    register themselves. Nothing else is in that cycle."""
    return {"nbtune.methods.registry", "nbtune.methods.builtin"} <= members and all(
        m.startswith("nbtune.methods.") for m in members)


def test_the_package_has_no_import_cycle():
    """Over all of nbtune, lazy (in-function) imports counted, `TYPE_CHECKING` ones not."""
    graph = _package_graph()
    assert "nbtune.engine.training.pipeline" not in graph["nbtune.engine.records.run"]  # the record calls no pipeline
    cycles = [sorted(c) for c in _cycles(graph) if not _registration_by_import(c)]
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_rule_finds_one_and_allows_only_the_registration():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert _registration_by_import({"nbtune.methods.registry", "nbtune.methods.builtin", "nbtune.methods.lora"})
    assert not _registration_by_import({"nbtune.methods.registry", "nbtune.methods.builtin", "nbtune.config"})


@pytest.mark.parametrize("layer", ["engine", "methods", "data", "objectives", "config"])
def test_the_lower_layers_import_no_view_magic_or_api(layer):
    """HTML lives with the views (nbtune/widgets, registered as IPython formatters by the top layer); the
    engine and everything below it import no widgets, magics, api or cli, lazily or not."""
    graph = _package_graph()
    upward = ("nbtune.widgets", "nbtune.magics", "nbtune.api", "nbtune.cli")
    offenders = {m: sorted(t for t in targets if t == "nbtune" or t.startswith(upward))
                 for m, targets in graph.items() if m.startswith(f"nbtune.{layer}")}
    assert not {m: t for m, t in offenders.items() if t}


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


def _objective_files() -> set[Path]:
    from nbtune.objectives import all_objectives

    return {PACKAGE / "objectives" / f"{spec.name}.py" for spec in all_objectives()}


def test_every_builtin_objective_has_a_file_of_its_own():
    assert {p.name for p in _objective_files()} >= {"sft.py", "dpo.py", "orpo.py", "simpo.py", "kto.py"}
    assert all(p.is_file() for p in _objective_files())


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_names_an_objective_outside_its_own_file(path):
    from nbtune.objectives import all_objectives

    if path in _objective_files():
        return
    names = {spec.name for spec in all_objectives()}
    named = [f"{path.name}:{line} {value!r}" for line, value in _compared_literals(path.read_text()) if value in names]
    assert not named, "ask the objective (ObjectiveSpec) what it declares instead of naming it: " + ", ".join(named)


def test_the_objective_name_rule_catches_a_branch():
    from nbtune.objectives import all_objectives

    names = {spec.name for spec in all_objectives()}
    found = _compared_literals("if config.objective in ('dpo', 'kto'):\n    pass\nok = objective != 'simpo'")
    assert [value for _, value in found if value in names] == ["dpo", "kto", "simpo"]


def test_the_pipeline_trains_through_the_runs_objective(llama_base, demo_rows, monkeypatch):
    """Another objective is one more registered spec: the pipeline asks it to tokenise and for its Trainer,
    and names nothing else."""
    import dataclasses

    import nbtune
    from nbtune.objectives import get_objective, register_objective

    sft, calls = get_objective("sft"), []

    def counting(hook):
        def call(*args, **kwargs):
            calls.append(hook)
            return getattr(sft, hook)(*args, **kwargs)
        return call

    register_objective(dataclasses.replace(sft, tokenize=counting("tokenize"), trainer=counting("trainer")),
                       replace=True)
    try:
        run = nbtune.finetune(data=demo_rows, base=llama_base, steps=1, batch_size=4, metric="none", save=False)
    finally:
        register_objective(sft, replace=True)
    assert run.status == "finished" and calls == ["tokenize", "trainer"]
