"""One runner for groups of runs (issue 30 item 4): what a config trains is decided in one place (`kind_of`),
a cross-validation gets what a sweep has (group events, Stop, a failed child recorded and the rest trained),
the workbench knows what its threads train, and the engine's groups import no display code."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import pytest
from conftest import nbtune_shell

import nbtune
import nbtune.engine.workbench as wb
from nbtune.config import RunConfig
from nbtune.config.sweep_space import check_sweep_spec
from nbtune.engine.experiments.groups import kind_of
from nbtune.engine.records.run import failure_recorded
from nbtune.errors import ConfigError, NbtuneError, NbtuneWarning

FAST = {"steps": 2, "batch_size": 4, "lr": 1e-2, "metric": "none"}
PACKAGE = Path(nbtune.__file__).parent


class Recorder:
    """A cross-validation observer that writes down its group events and its fold runs' start and end."""

    def __init__(self):
        self.events = []

    def on_cv_start(self, cv):
        self.events.append(("cv_start", cv.status, len(cv.runs)))

    def on_fold_start(self, cv, run, params):
        self.events.append(("fold_start", run.name, run.status, dict(params)))

    def on_run_end(self, run):
        self.events.append(("run_end", run.name, run.status))

    def on_fold_end(self, cv, record):
        self.events.append(("fold_end", record["run"], record["status"]))

    def on_cv_end(self, cv):
        self.events.append(("cv_end", cv.status, len(cv.runs)))


# ------------------------------------------------------------------ the one decision
@pytest.mark.parametrize("config, kind", [
    ({"data": "demo", "steps": 3}, "run"),
    ({"cv": 3}, "cross-validation"),
    ({"cv": 3, "cv_fold": 2}, "run"),  # one fold's own config: one run
    ({"sweep": {"r": [4, 8]}}, "sweep"),
    ({"cv": 0, "sweep": None}, "run"),  # cv 0: off
])
def test_kind_of_decides_from_a_cells_mapping_and_from_a_parsed_config_alike(config, kind):
    assert kind_of(config) == kind
    assert kind_of(RunConfig.parse(**{"name": "k", "data": "demo", **config})) == kind


def test_a_cell_trains_what_kind_of_says_and_shows_a_cross_validation_as_its_table(tiny_model_dir, demo_rows):
    cell = "data: {{ rows }}\nsteps: 2\nbatch_size: 4\nmetric: none\nsave: false\n"
    with nbtune_shell(tiny_model_dir, rows=demo_rows[:12]) as ip:
        cv = ip.run_cell_magic("finetune", "x --no-panel", cell + "cv: 2\n")
        fold = ip.run_cell_magic("finetune", "y --no-panel", cell + "cv: 2\ncv_fold: 1\n")
        assert type(cv).__name__ == "CrossValidation" and [r.name for r in cv.runs] == ["x-fold1", "x-fold2"]
        assert isinstance(fold, nbtune.Run) and fold.name == "y"
        assert nbtune.cross_validations["x"] is cv and "y" not in nbtune.cross_validations
        shown, _ = ip.display_formatter.format(cv)  # the view the extension registered for the engine's object
        assert "<table>" in shown["text/html"] and "x-fold2" in shown["text/html"]
        assert shown["text/plain"].startswith("cross-validation 'x': 2 of 2 folds finished")
        for comparison in (cv.compare(), nbtune.compare(*cv.runs)):  # the group's, and nbtune.compare's own
            assert "class='nbtune-compare'" in ip.display_formatter.format(comparison)[0]["text/html"]
    assert "text/html" not in ip.display_formatter.format(cv)[0]  # unloaded: its view is gone with it


# ------------------------------------------------------------------ the sweep's metric is `optimize`
def test_the_old_spelling_of_the_metric_is_one_line_naming_the_new_one():
    config = RunConfig.parse(name="s", data="demo")
    for old, new in (({"eval_loss": "min"}, "{eval_loss: min}"), ("exact_match", "exact_match")):
        with pytest.raises(ConfigError) as info:
            check_sweep_spec({"r": [4], "objective": old}, config)
        assert str(info.value) == ("`sweep.objective` is now `sweep.optimize` (objective: is what a run learns from, "
                                   f"sft or dpo); write `optimize: {new}`.") and info.value.field == "sweep"
    # `objective` is what a run learns from: a list of them is a setting to search like any other
    spec = check_sweep_spec({"objective": ["sft", "dpo"], "optimize": {"eval_loss": "min"}}, config)
    assert spec.names == ["objective"] and spec.dimensions[0].choices == ("sft", "dpo")
    assert (spec.optimize, spec.direction, spec.fingerprint()["optimize"]) == ("eval_loss", "minimize", "eval_loss")


# ------------------------------------------------------------------ a cross-validation gets what a sweep has
def test_a_failed_fold_is_recorded_and_the_other_folds_train(tiny_model_dir, demo_rows, monkeypatch):
    real = wb.train_run

    def broken_second_fold(run, **kwargs):
        if run.name == "x-fold2":
            with failure_recorded(run):  # as the pipeline records a crash
                raise RuntimeError("a broken GPU")
        return real(run, **kwargs)

    monkeypatch.setattr(wb, "train_run", broken_second_fold)
    recorder = Recorder()
    with pytest.warns(NbtuneWarning, match=r"cross-validation 'x': fold 2 failed \(RuntimeError: a broken GPU\); "
                                           "the other folds go on"):
        cv = nbtune.finetune(model=str(tiny_model_dir), data=demo_rows, cv=3, name="x", observers=[recorder], **FAST)
    assert [r.status for r in cv.runs] == ["finished", "failed", "finished"] and cv.status == "finished"
    assert not cv.complete and "incomplete" in cv.headline()
    assert cv.folds[1]["error"] == "RuntimeError: a broken GPU" and "error" not in cv.folds[0]
    assert cv.summary()["eval_loss"]["folds"] == 2  # the finished folds only
    assert "x-fold2" not in nbtune.runs and nbtune.runs["x-fold3"] is cv.runs[2]  # it trained nothing to keep
    assert [e[:3] for e in recorder.events if e[0].startswith(("fold", "cv"))] == [
        ("cv_start", "running", 0), ("fold_start", "x-fold1", "pending"), ("fold_end", "x-fold1", "finished"),
        ("fold_start", "x-fold2", "pending"), ("fold_end", "x-fold2", "failed"),
        ("fold_start", "x-fold3", "pending"), ("fold_end", "x-fold3", "finished"), ("cv_end", "finished", 3)]
    assert [e[3] for e in recorder.events if e[0] == "fold_start"] == [{"cv_fold": 1}, {"cv_fold": 2}, {"cv_fold": 3}]


def test_stop_ends_a_cross_validation_after_the_running_fold(tiny_model_dir, demo_rows):
    class StopInFold2(Recorder):
        cv = None

        def on_cv_start(self, cv):
            self.cv = cv

        def on_step(self, run, record):
            if run.config.cv_fold == 2 and not run.stop_requested:
                self.cv.stop()  # a panel's Stop, from the group

    cv = nbtune.finetune(model=str(tiny_model_dir), data=demo_rows, cv=3, name="x", observers=[StopInFold2()],
                         **{**FAST, "steps": 3})
    assert [r.status for r in cv.runs] == ["finished", "stopped"] and cv.status == "stopped"
    assert cv.runs[1].history[-1]["step"] < 3 and "x-fold3" not in nbtune.runs
    assert cv.to_dict()["status"] == "stopped" and not cv.complete


# ------------------------------------------------------------------ threads
def test_a_background_sweep_is_known_by_what_it_trains_and_stops_from_another_thread(tiny_model_dir, demo_rows):
    """The workbench refused a second job while a sweep ran by its thread's name ("nbtune-sweep-..."); it keeps
    the sweep with its thread instead (moved from test_sweep.py, where it stopped the sweep from another thread)."""
    started = threading.Event()

    class Started:
        def on_run_start(self, run):
            started.set()

    sweep = nbtune.finetune(model=str(tiny_model_dir), data=demo_rows, name="s", **{**FAST, "steps": 400},
                            eval_split=0.25, sweep={"r": [2, 4]}, background=True, observers=[Started()])
    assert started.wait(60)
    sweep._thread.name = "any-name"
    with pytest.raises(NbtuneError, match=r"^sweep 's' is still running in the background; stop it "
                       r"\(nbtune.sweeps\['s'\].stop\(\)\) or wait for it"):
        nbtune.finetune(model="x", steps=1)
    sweep.stop()
    sweep.wait(120)
    assert sweep.status == "stopped" and [r["status"] for r in sweep.records] == ["stopped"]
    assert sweep.runs[0].history[-1]["step"] < 400


# ------------------------------------------------------------------ the layers
def _imports(path: Path) -> set[str]:
    """Every nbtune module `path` imports, at the top or inside a function (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(
        node.test) for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("nbtune")}


@pytest.mark.parametrize("path", sorted([*PACKAGE.glob("engine/experiments/*.py"), PACKAGE / "engine/workbench.py",
                                         PACKAGE / "config/sweep_space.py"]), ids=lambda p: p.name)
def test_groups_of_runs_import_no_display_or_top_layer_code(path):
    upward = sorted(m for m in _imports(path) if m.startswith(("nbtune.widgets", "nbtune.magics", "nbtune.api",
                                                                "nbtune.cli")) or m == "nbtune")
    assert not upward, f"{path.name} imports {upward}"
    if path.parent.name == "config":  # the config package is below the engine
        assert not [m for m in _imports(path) if m.startswith("nbtune.engine.experiments")]
