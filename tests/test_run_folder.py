"""run.json has one owner (engine/records/run_folder.py): a schema version in the file, every field of a Run
round-trips, files of the earlier schema still load everywhere, and a damaged or foreign file is one clear line
(issue 30, item 3)."""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from conftest import InterruptAt, finetune_interrupted

import nbtune
from nbtune.config import RunConfig
from nbtune.engine.records import run_folder
from nbtune.engine.records.history import saved_record
from nbtune.engine.records.run import Run
from nbtune.errors import ConfigError, NbtuneError, NbtuneWarning
from nbtune.methods import MethodContext, get_method
from nbtune.methods.registry import all_methods
from nbtune.objectives import all_objectives

# What a schema-1 run.json looks like: the file nbtune 0.1.0 (commit 6ca9eb4) wrote for a 2-step LoRA run of
# `model` on `rows.jsonl` (relative paths: a test puts both in its folder), unedited.
SCHEMA_1 = Path(__file__).parent / "data" / "run_schema1.json"
# The Run's attributes that are not the record: the model and what holds it, what is read again from the data
# (eval_pairs), the rows kept beside run.json in predictions.jsonl, and live-run plumbing.
NOT_RECORDED = {"model", "tokenizer", "context", "eval_pairs", "prediction_rows", "_observers", "_stop", "_thread",
                "_session"}
RECORDED_AS = {"_status": "status"}  # attribute -> record field, where they are named apart
OPTIONS = {"peft": {"peft_type": "loha", "peft_args": {"r": 4}}}  # a method that has no default for one


def recorded(run: Run) -> dict[str, Any]:
    """Every field of the record as the Run holds it (config as a RunConfig, compared by value). `saved_to` is
    left out of the metrics: the pipeline notes it there after the save wrote run.json."""
    metrics = {k: v for k, v in run.metrics.items() if k != "saved_to"}
    return {"name": run.name, "id": run.id, "status": run.status, "method": run.method.name, "error": run.error,
            "config": run.config, "metrics": metrics, "history": list(run.history),
            "eval_history": run.eval_history, "samples": run.samples, "provenance": run.provenance,
            "total_steps": run.total_steps, "base_name": run.base_name, "saved_to": run.saved_to}


def test_every_attribute_of_a_run_is_recorded_or_named_as_not_recorded():
    config = RunConfig.parse({"name": "x", "model": "m", "data": "d.jsonl"})
    run = Run(config, get_method("lora"), MethodContext(options=config.options, config=config, workdir=Path(".")))
    held = {RECORDED_AS.get(attribute, attribute) for attribute in vars(run)} - NOT_RECORDED
    assert held == set(recorded(run))  # a new attribute of Run is recorded (and checked here) or named above
    written = set(run.to_dict()) - {"schema", "nbtune_version", "save_format"}  # about the file, not the run
    assert written == held


@pytest.mark.parametrize("objective", [o.name for o in all_objectives()])
@pytest.mark.parametrize("method", [m.name for m in all_methods()])
def test_from_dict_round_trips_every_field_for_every_method_and_objective(method, objective, tmp_path):
    """Built directly (no training: 18 methods x 5 objectives would take minutes): a Run with every field
    set, as a stopped run has them. test_a_trained_run_round_trips_through_its_folder trains real ones."""
    try:
        config = RunConfig.parse({"name": f"{method}_{objective}", "model": "tiny", "method": method,
                                  "objective": objective, "data": "rows.jsonl", "steps": 10, "eval_split": 0.25,
                                  "metric": ["exact_match"], "sample_every": 2, "sample_prompts": ["hello"],
                                  **OPTIONS.get(method, {})})
    except ConfigError as exc:
        pytest.skip(f"no such run: {exc}")  # e.g. adalora refuses dpo and kto
    spec = get_method(method)
    run = Run(config, spec, MethodContext(options=config.options, config=config, workdir=tmp_path),
              status="stopped")
    run.error, run.total_steps, run.base_name, run.saved_to = None, 10, "tiny", Path("runs") / config.name
    run.metrics = {"steps": 4, "train_loss": 1.25, "eval_loss": 1.5, "exact_match": 0.5, "trainable_params": 10}
    run.history.extend({"step": s, "loss": 2.0 / s, "lr": 1e-3, "grad_norm": 0.5} for s in range(1, 5))
    run.eval_history = [{"step": 2, "eval_loss": 1.75}, {"step": 4, "eval_loss": 1.5}]
    run.samples = [{"step": 2, "prompt": "hello", "answer": "hi"}]
    run.provenance = {"seed": 42, "model": {"name": "tiny", "path": "tiny", "in_memory": False}}
    record = run.to_dict()
    assert record["schema"] == run_folder.SCHEMA and record["save_format"] == spec.save_format(config.options)
    for again in (Run.from_dict(record), Run.from_dict(json.loads(json.dumps(record)))):  # in memory, as a file has it
        assert recorded(again) == recorded(run) and again.to_dict() == record
        assert again.model is None and again.method is spec and again.context.workdir != tmp_path
    run_folder.write_record(tmp_path, record)
    reopened = Run.from_dict(run_folder.read_record(tmp_path), folder=tmp_path)
    assert recorded(reopened) == {**recorded(run), "saved_to": tmp_path}


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_a_trained_run_round_trips_through_its_folder(objective, tiny_model_dir, demo_rows):
    from nbtune.data.demo import demo_pair_splits

    rows = demo_pair_splits()[0][:16] if objective == "dpo" else demo_rows[:16]
    Path("rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    run = nbtune.finetune(name=f"rt_{objective}", model=str(tiny_model_dir), data="rows.jsonl", objective=objective,
                          steps=2, batch_size=4, eval_split=0.25, eval_steps=1, metric="exact_match",
                          metric_samples=2, max_length=96, sample_every=1, sample_prompts=["1 May 2000"])
    assert run.history and run.eval_history and run.samples and run.provenance and run.prediction_rows
    again = Run.from_dict(run.to_dict())
    assert recorded(again) == recorded(run)
    reopened = saved_record(run.saved_to)  # what history() and compare rebuild, from the folder
    assert recorded(reopened) == recorded(run) and reopened.prediction_rows == run.prediction_rows
    loaded = nbtune.load(run.saved_to)
    assert recorded(loaded) == recorded(run) and loaded.model is not None


def test_load_and_history_rebuild_a_stopped_run_alike(tiny_model_dir, demo_rows):
    """They used to disagree on `total_steps` (load: steps reached; history: the last step); now both read it."""
    Path("rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in demo_rows[:16]))  # a list: "<list>"
    run = finetune_interrupted(name="cut", model=str(tiny_model_dir), data="rows.jsonl", steps=6, batch_size=4,
                               metric="none", observers=[InterruptAt(2)])
    assert run.status == "stopped" and run.total_steps == 6 and run.history[-1]["step"] == 2
    loaded, listed = nbtune.load(run.saved_to), saved_record(run.saved_to)
    assert recorded(loaded) == recorded(listed) == recorded(run)
    assert {row["name"]: row["steps"] for row in nbtune.history().table()} == {"cut": "2/6"}


# ---------------------------------------------------------------- schema 1: the files earlier releases wrote
def schema_1(**changes: Any) -> dict[str, Any]:
    record = json.loads(SCHEMA_1.read_text())
    record.update(changes)
    return record


def put(folder: str, record: dict[str, Any]) -> Path:
    path = Path("runs") / folder
    path.mkdir(parents=True, exist_ok=True)
    (path / "run.json").write_text(json.dumps(record, indent=2))
    return path


@pytest.fixture
def old_sft(tiny_model_dir, demo_rows):
    """runs/old_sft as nbtune 0.1.0 left it: the adapter (trained here on the same model, data and settings)
    and its schema-1 run.json."""
    shutil.copytree(tiny_model_dir, "model")
    Path("rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in demo_rows[:24]))
    given = schema_1()["config"]
    settings = {k: given[k] for k in ("steps", "batch_size", "lr", "metric", "metric_samples", "eval_split",
                                      "eval_steps", "max_length", "precision", "sample_every", "sample_prompts")}
    nbtune.finetune(name="old_sft", model="model", data="rows.jsonl", **settings)
    nbtune.runs.clear()  # a new kernel
    return put("old_sft", schema_1())


def test_a_schema_1_file_is_read_as_schema_2():
    old = schema_1()
    assert "schema" not in old and old["config"]["beta"] is None and old["config"]["precompute_ref"] is False
    record = run_folder.checked(old)
    assert record["schema"] == 2 and record["total_steps"] == 2 and record["base_name"] == "model"
    assert record["saved_to"] is None and record["id"] == old["id"]
    assert not {"beta", "loss_type", "precompute_ref"} & set(record["config"])  # sft's defaults, dropped
    assert {k: v for k, v in record["config"].items() if k not in ("beta", "loss_type", "precompute_ref")} == {
        k: v for k, v in old["config"].items() if k not in ("beta", "loss_type", "precompute_ref")}
    assert old == schema_1()  # the caller's dict is left as it was
    dpo = run_folder.checked(schema_1(config={**old["config"], "objective": "dpo", "beta": 0.1}))
    assert dpo["config"]["beta"] == 0.1 and "loss_type" not in dpo["config"]  # set: kept
    swept = {"r": [4, 8], "objective": {"eval_loss": "min"}, "trials": 2}
    searched = run_folder.checked(schema_1(config={**old["config"], "sweep": swept}))
    assert searched["config"]["sweep"] == {"r": [4, 8], run_folder.SWEEP_METRIC: {"eval_loss": "min"}, "trials": 2}


def test_the_oldest_schema_1_files_are_read_too():
    """The first releases wrote no id, save_format, samples or provenance, and one wrote a `given` copy of
    the config beside it (git log -p -- nbtune/engine/result.py)."""
    old = schema_1()
    for key in ("id", "save_format", "samples", "provenance"):
        del old[key]
    old["given"] = {"name": "old_sft", "steps": 2}
    record = run_folder.checked(old)
    assert record["id"] is None and record["samples"] == [] and record["provenance"] == {}
    assert record["save_format"] == "peft" and record["base_name"] is None and "given" not in record
    run = Run.from_dict(old)
    assert run.id and run.provenance == {} and run.total_steps == 2 and run.history == old["history"]


@pytest.fixture
def run_json_readers(monkeypatch) -> set[str]:
    """The nbtune modules that open a run.json from here on (the first nbtune frame under the open)."""
    import builtins
    import io

    readers: set[str] = set()
    real_open, real_path_open = builtins.open, Path.open

    def who(file: Any) -> None:
        if Path(str(file)).name == "run.json":
            frame = sys._getframe(2)
            while frame is not None and not frame.f_globals.get("__name__", "").startswith("nbtune"):
                frame = frame.f_back
            readers.add(frame.f_globals["__name__"] if frame is not None else "?")

    def opened(file: Any, *args: Any, **kwargs: Any) -> Any:
        who(file)
        return real_open(file, *args, **kwargs)

    def path_opened(self: Path, *args: Any, **kwargs: Any) -> Any:
        who(self)
        return real_path_open(self, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", opened)
    monkeypatch.setattr(io, "open", opened)
    monkeypatch.setattr(Path, "open", path_opened)
    return readers


def test_a_schema_1_run_loads_through_load_load_run_history_and_compare(old_sft, run_json_readers):
    before = json.loads((old_sft / "run.json").read_text())
    run_json_readers.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NbtuneWarning)  # its provenance is checked: the weights and data it names
        loaded = nbtune.load(old_sft)
    assert loaded.id == before["id"] and loaded.status == "finished" and loaded.total_steps == 2
    assert loaded.history == before["history"] and loaded.samples == before["samples"]
    assert loaded.config.objective == "sft" and loaded.config.steps == 2 and loaded.model is not None
    assert loaded.owns_saved_folder()
    again = nbtune.load_run(old_sft)
    assert nbtune.runs["old_sft"] is again and again.metrics == before["metrics"]
    rows = {row["name"]: row for row in nbtune.history().table()}
    assert rows["old_sft"]["status"] == "finished" and rows["old_sft"]["steps"] == "2/2"
    cmp = nbtune.compare(nbtune.history()["old_sft"], again)
    assert [row["exact_match"] for row in cmp.table() if row["run"] != "old_sft"][-1] == 0.0
    assert run_json_readers == {"nbtune.engine.records.run_folder"}  # nothing else opens a run.json
    assert json.loads((old_sft / "run.json").read_text()) == before  # reading never rewrites the file


def test_schema_1_trials_and_preference_runs_are_listed_and_compared(old_sft):
    old = schema_1()
    put("s/1", schema_1(name="s/1", id="t1", config={**old["config"], "name": "s/1", "r": 4}))
    searched = {**old["config"], "name": "searched", "sweep": {"r": [4, 8], "objective": {"eval_loss": "min"}}}
    put("searched", schema_1(name="searched", id="sw", config=searched))
    put("old_dpo", schema_1(name="old_dpo", id="d1", config={**old["config"], "name": "old_dpo",
                                                              "objective": "dpo", "beta": 0.1}))
    rows = {row["name"]: row for row in nbtune.history().table()}
    assert {rows[n]["status"] for n in ("s/1", "searched", "old_dpo", "old_sft")} == {"finished"}
    history = nbtune.history()
    assert saved_record(history["s/1"].path).config.options["r"] == 4
    assert saved_record(history["searched"].path).config.sweep["r"] == [4, 8]
    dpo = saved_record(history["old_dpo"].path)
    assert dpo.config.objective == "dpo" and dpo.to_dict()["config"]["beta"] == 0.1
    table = nbtune.compare(history["s/1"], history["old_dpo"], history["old_sft"]).table()
    assert {"old_sft", "old_dpo", "s/1"} <= {row["run"] for row in table}


# ---------------------------------------------------------------- what is not a run's record
@pytest.mark.parametrize(("content", "why"), [
    ("{not json", "run.json unreadable"),
    (json.dumps([1, 2]), "not one nbtune wrote"),
    (json.dumps({"hello": 1}), "not one nbtune wrote"),
    (json.dumps({**schema_1(), "schema": 3}), "newer nbtune (schema 3"),
    (json.dumps({**schema_1(), "status": "exploded"}), "status 'exploded' is none of"),
    (json.dumps({**schema_1(), "schema": 2}), "`total_steps` is NoneType"),  # says 2, lacks its fields
    (json.dumps({**schema_1(), "history": [1, 2]}), "history is not step records"),
])
def test_a_damaged_or_foreign_run_json_is_one_clear_error_and_a_row_that_says_why(content, why):
    folder = Path("runs") / "bad"
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(content)
    with pytest.raises(run_folder.RecordError, match=r"^'runs/bad'") as info:
        run_folder.read_record(folder)
    assert why in info.value.why and "\n" not in str(info.value)
    with pytest.raises(NbtuneError, match="runs/bad"):
        nbtune.load(folder)
    row = nbtune.history().table()[0]
    assert row["status"] == "unreadable" and why in row["folder"]


def test_rewrite_status_is_atomic_changes_only_the_status_and_upgrades_the_file():
    folder = put("trial", schema_1())
    run_folder.rewrite_status(folder, "pruned")
    after = json.loads((folder / "run.json").read_text())
    assert after["status"] == "pruned" and after["schema"] == 2
    assert {k: v for k, v in after.items() if k != "status"} == {
        k: v for k, v in run_folder.checked(schema_1()).items() if k != "status"}
    assert [p.name for p in folder.iterdir()] == ["run.json"]  # no partial file left
    with pytest.raises(ValueError, match="unknown run status"):
        run_folder.rewrite_status(folder, "gone")
