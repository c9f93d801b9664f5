"""Hyperparameter sweeps (`sweep:`): Optuna trials as ordinary runs `<sweep>/<n>` on the one cached base, a durable
study, pruning, resume after an interrupt or a Stop, and every bad block refused before any weight loads."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import optuna
import pytest
from conftest import InterruptAt

import nbtune
import nbtune.engine.workbench as wb
from nbtune.config import RunConfig
from nbtune.config.sweep_space import check_sweep_spec
from nbtune.errors import ConfigError, DataError, NbtuneError, NbtuneWarning, RunInterrupted
from nbtune.widgets.sweep_render import sweep_html

FAST = {"steps": 2, "batch_size": 4, "lr": 1e-2, "metric": "none", "eval_split": 0.25}


@pytest.fixture
def sweep_of(tiny_model_dir, demo_rows):
    """nbtune.finetune of a sweep on the tiny model: FAST settings, then the test's keys."""

    def run(sweep, **config):
        return nbtune.finetune(**{"model": str(tiny_model_dir), "data": demo_rows, "name": "s", **FAST, **config},
                               sweep=sweep)

    return run


class Recorder:
    """A sweep observer that writes down every event it gets, sweep-level and run-level, with what it saw."""

    def __init__(self):
        self.events = []

    def on_sweep_start(self, sweep):
        self.events.append(("sweep_start", sweep.status, len(sweep.records)))

    def on_trial_start(self, sweep, run, params):
        self.events.append(("trial_start", run.name, run.status, dict(params)))

    def on_run_start(self, run):
        self.events.append(("run_start", run.name))

    def on_run_end(self, run):
        self.events.append(("run_end", run.name, run.status))

    def on_trial_end(self, sweep, record):
        self.events.append(("trial_end", record["name"], record["status"], sweep.records[-1] is record))

    def on_sweep_end(self, sweep):
        self.events.append(("sweep_end", sweep.status, len(sweep.records)))


class Broken:
    def on_trial_start(self, sweep, run, params):
        raise RuntimeError("a display bug")


class InterruptInTrial(InterruptAt):
    """Ctrl-C at `step` of the trial run `name` only."""

    def __init__(self, name, step=1):
        super().__init__(step)
        self.name = name

    def on_step(self, run, record):
        if run.name == self.name:
            super().on_step(run, record)


# ------------------------------------------------------------------ a grid, end to end
def test_a_grid_runs_each_point_as_a_trial_on_one_loaded_base(sweep_of, loads):
    recorder = Recorder()
    with pytest.warns(NbtuneWarning, match="Broken.on_trial_start failed"):
        sweep = sweep_of({"r": [4, 8], "lr": [1e-3, 1e-2]}, observers=[recorder, Broken()])
    assert sweep.status == "finished" and sweep.planned == 4 and sweep.params == ["r", "lr"]
    assert [r["name"] for r in sweep.records] == ["s/0", "s/1", "s/2", "s/3"]
    assert all(nbtune.runs[f"s/{n}"] is sweep.runs[n] for n in range(4))
    assert len(loads) == 1 and len(wb.WORKBENCH.bases) == 1  # one load for every trial
    for record in sweep.records:  # each trial's config is the sweep's, with its sampled params
        config = sweep.runs[record["number"]].config
        assert (config.options["r"], config.lr) == (record["params"]["r"], record["params"]["lr"])
        assert config.sweep is None and config.steps == 2 and record["status"] == "finished"
        assert record["value"] == sweep.runs[record["number"]].metrics["eval_loss"]
        assert Path(f"runs/s/{record['number']}/run.json").is_file()
    assert {(r["params"]["r"], r["params"]["lr"]) for r in sweep.records} == {(4, 1e-3), (4, 1e-2), (8, 1e-3),
                                                                             (8, 1e-2)}
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{Path('runs/s/study.db').resolve()}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4

    best = min(sweep.records, key=lambda r: r["value"])
    assert sweep.best is best and sweep.best_run is sweep.runs[best["number"]]
    frame = sweep.trials
    assert list(frame.columns) == ["number", "status", "r", "lr", "eval_loss", "steps", "seconds", "run"]
    assert frame["eval_loss"].min() == best["value"] and list(frame["run"]) == ["s/0", "s/1", "s/2", "s/3"]
    assert [n for n, run in sweep.runs.items() if run.model is not None] == sorted(
        r["number"] for r in sorted(sweep.records, key=lambda r: r["value"])[:2])  # keep_models: 2

    cell = sweep.to_cell()
    first, _, text = cell.partition("\n")
    assert first == "%%finetune s-best" and "sweep" not in text
    again = RunConfig.parse(text)
    assert "max_grad_norm" not in text and "seed" not in text  # only what this config chose
    assert (again.options["r"], again.lr, again.steps) == (best["params"]["r"], best["params"]["lr"], 2)
    assert "best" in repr(sweep) and "s/" not in repr(sweep).splitlines()[0]
    assert "nbtune-sweep-snapshot" in sweep_html(sweep) and "★" in sweep_html(sweep)  # its view in a notebook
    assert [r.name for r in sweep.compare().runs] == ["s/0", "s/1", "s/2", "s/3"]

    kinds = [e[0] for e in recorder.events]
    assert kinds[0] == "sweep_start" and recorder.events[-1] == ("sweep_end", "finished", 4)
    assert kinds[1:-1] == ["trial_start", "run_start", "run_end", "trial_end"] * 4
    starts = [e for e in recorder.events if e[0] == "trial_start"]
    assert all(e[2] == "pending" for e in starts)  # told before it trains
    assert [e[3] for e in starts] == [r["params"] for r in sweep.records]
    assert all(e[3] for e in recorder.events if e[0] == "trial_end")  # the record was appended first

    rerun = sweep_of({"r": [4, 8], "lr": [1e-3, 1e-2]})
    assert rerun.status == "finished" and len(rerun.records) == 4 and len(loads) == 1  # done: nothing to train
    assert rerun.best["number"] == best["number"]


class HeldModels:
    """How many trials hold their model whenever a trial ends."""

    def __init__(self):
        self.held = []

    def on_trial_end(self, sweep, record):
        self.held.append(sum(run.model is not None for run in sweep.runs.values()))


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_samplers_draw_within_the_bounds(sweep_of, sampler):
    held = HeldModels()
    sweep = sweep_of({"lr": {"log_uniform": [1e-4, 1e-2]}, "dropout": {"uniform": [0.0, 0.2]},
                      "r": {"int": [2, 6]}, "trials": 3, "sampler": sampler, "keep_models": 1}, observers=[held])
    assert len(sweep.records) == 3 and sweep.status == "finished"
    for record in sweep.records:
        params, config = record["params"], sweep.runs[record["number"]].config
        assert 1e-4 <= params["lr"] <= 1e-2 and 0.0 <= params["dropout"] <= 0.2
        assert isinstance(params["r"], int) and 2 <= params["r"] <= 6
        assert (config.lr, config.options["dropout"], config.options["r"]) == (params["lr"], params["dropout"],
                                                                                params["r"])
    assert len({r["params"]["lr"] for r in sweep.records}) == 3
    holding = [n for n, run in sweep.runs.items() if run.model is not None]
    assert holding == [sweep.best["number"]] and held.held == [1, 1, 1]  # keep_models: 1, from each trial's end


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(sweep_of):
    # moe needs a mixture-of-experts model: on the tiny dense Llama its trial fails once the base is loaded
    sweep = sweep_of({"method": ["lora", "moe"], "seed": [1, 2]}, lr=None)
    by_method = {}
    for record in sweep.records:
        by_method.setdefault(record["params"]["method"], []).append(record)
    assert [r["status"] for r in by_method["moe"]] == ["failed", "failed"]
    assert all("mixture-of-experts" in r["error"] and r["value"] is None for r in by_method["moe"])
    assert [r["status"] for r in by_method["lora"]] == ["finished", "finished"]
    assert sweep.status == "finished" and sweep.best["params"]["method"] == "lora"
    study = sweep.study
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "COMPLETE", "FAIL", "FAIL"]


# ------------------------------------------------------------------ pruning
def test_a_pruned_trial_is_stopped_early_and_told_pruned(sweep_of, monkeypatch):
    asked = []

    def should_prune(trial):  # prune trial 1 at its first evaluation point
        asked.append(trial.number)
        return trial.number == 1

    monkeypatch.setattr(optuna.trial.Trial, "should_prune", should_prune)
    sweep = sweep_of({"r": [4, 8], "pruner": "median"}, steps=5)
    pruned = sweep.records[1]
    run = sweep.runs[1]
    assert pruned["status"] == "pruned" and pruned["steps"] < 5
    assert pruned["value"] == run.eval_history[-1]["eval_loss"]  # its last reported eval_loss
    assert sweep.records[0]["status"] == "finished" and sweep.best["number"] == 0
    assert run.config.eval_steps == 1  # set for the pruner: steps // 5
    assert [t.state.name for t in sweep.study.trials] == ["COMPLETE", "PRUNED"]
    assert 0 in asked
    # Issue 29 item 7: pruned, not "stopped" (which says: resumable), in the kernel, on disk and in history()
    assert run.status == "pruned" and json.loads(Path("runs/s/1/run.json").read_text())["status"] == "pruned"
    rows = {row["name"]: row for row in nbtune.history().table()}
    assert (rows["s/1"]["status"], rows["s/0"]["status"]) == ("pruned", "finished")
    assert {r["name"]: r["status"] for r in nbtune.runs.table()}["s/1"] == "pruned"
    for resume in (run.resume, lambda: wb.WORKBENCH.resume("s/1")):  # the latter: `%finetune s/1 --resume`
        with pytest.raises(NbtuneError, match="run 's/1' was pruned by its sweep; a pruned trial is not resumed"):
            resume()
    assert run.checkpoint is None and nbtune.load_run("runs/s/1").status == "pruned"  # no checkpoint kept


def test_the_median_pruner_prunes_a_hopeless_trial(sweep_of):
    # the two startup trials learn fast; a near-zero learning rate keeps its loss well above their median
    sweep = sweep_of({"lr": [3e-2, 2e-2, 1e-7, 2e-7], "pruner": "median", "sampler": "grid"}, steps=6,
                     eval_steps=1, lr=None)
    statuses = {r["params"]["lr"]: r["status"] for r in sweep.records}
    assert "pruned" in statuses.values(), sweep.records
    assert all(statuses[lr] == "finished" for lr in (3e-2, 2e-2) if lr in statuses)
    assert sweep.best["params"]["lr"] in (3e-2, 2e-2)


# ------------------------------------------------------------------ interrupt, Stop, resume
def test_an_interrupted_sweep_resumes_to_its_planned_trials(sweep_of, tiny_model_dir, demo_rows, loads):
    config = {"model": str(tiny_model_dir), "data": demo_rows, "name": "s", **FAST,
              "sweep": {"lr": {"log_uniform": [1e-4, 1e-2]}, "trials": 4, "sampler": "random"}}
    recorder = Recorder()
    with pytest.raises(RunInterrupted, match=r"sweep 's' was interrupted with 2 of 4 trials done") as info:
        nbtune.finetune(config, observers=[InterruptInTrial("s/2"), recorder])
    sweep = info.value.sweep
    # the cell raised, so no `sweep` variable exists: the advice names where the sweep is (issue 29 item 6)
    assert "nbtune.sweeps['s'].resume()" in str(info.value) and "; sweep.resume()" not in str(info.value)
    assert nbtune.sweeps["s"] is sweep
    assert sweep.status == "stopped" and recorder.events[-1] == ("sweep_end", "stopped", 3)
    assert [r["status"] for r in sweep.records] == ["finished", "finished", "stopped"]
    assert nbtune.runs["s/2"].status == "stopped" and info.value.run is nbtune.runs["s/2"]
    interrupted = sweep.records[2]["params"]

    again = nbtune.finetune(config)
    assert again.status == "finished" and [r["number"] for r in again.records] == [0, 1, 3, 4]
    assert again.ran_here == [3, 4] and again.best_run is nbtune.runs[again.best["name"]]
    assert again.records[2]["params"] == interrupted  # the interrupted trial's params first
    assert [t.state.name for t in again.study.trials] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert len(loads) == 1


def test_stop_ends_the_sweep_and_resume_finishes_it(sweep_of):
    class StopAt:
        sweep = None

        def on_sweep_start(self, sweep):
            self.sweep = sweep

        def on_step(self, run, record):
            if run.name == "s/1" and record["step"] == 1 and not run.stop_requested:
                self.sweep.stop()  # the panel's Stop button

    sweep = sweep_of({"r": [2, 4, 8]}, observers=[StopAt()], steps=3)
    assert sweep.status == "stopped" and [r["status"] for r in sweep.records] == ["finished", "stopped"]
    stopped = sweep.records[1]["params"]
    sweep.observers.clear()
    assert sweep.resume() is sweep and sweep.status == "finished"
    assert [r["number"] for r in sweep.records] == [0, 2, 3] and sweep.records[1]["params"] == stopped
    assert {r["params"]["r"] for r in sweep.records} == {2, 4, 8}


def test_a_background_sweep_draws_no_bar_from_its_thread(sweep_of, capfd):
    """Issue 29 item 11: the bar over the trials, drawn from the sweep's thread, landed under whichever cell
    ran at the time; a background sweep shows itself in its own cell (panel, or its line)."""
    sweep_of({"r": [4]}, name="a").wait()
    assert "sweep a:" in capfd.readouterr().err  # blocking: the bar, under the cell that waits for it
    sweep = sweep_of({"r": [4, 8]}, name="b", background=True).wait(120)
    assert sweep.status == "finished" and "sweep b:" not in capfd.readouterr().err
    assert sweep_of({"r": [4]}, name="c", background=True, progress=True).wait(120).status == "finished"
    assert "sweep c:" in capfd.readouterr().err  # asked for


# ------------------------------------------------------------------ trial configs (no training)
def test_a_trial_of_another_method_keeps_only_the_options_it_has():
    from nbtune.engine.experiments.sweep_config import trial_config

    config = RunConfig.parse(name="s", data="demo", steps=10, alpha=32, sweep={"method": ["lora", "ia3", "dora"]})
    spec = check_sweep_spec(config.sweep, config)
    ia3 = trial_config(config, spec, {"method": "ia3"}, name="s/0", output_dir=None)
    assert ia3.method == "ia3" and "alpha" not in ia3.options and ia3.lr == RunConfig.parse(method="ia3").lr
    dora = trial_config(config, spec, {"method": "dora"}, name="s/1", output_dir="out/1")
    assert dora.options["alpha"] == 32 and dora.output_dir == "out/1" and dora.sweep is None


def test_a_pruner_makes_trials_evaluate_about_five_times():
    from nbtune.engine.experiments.sweep_config import trial_config

    for steps, expected in ((40, 8), (4, 1)):
        config = RunConfig.parse(name="s", data="demo", steps=steps, sweep={"r": [4, 8], "pruner": "hyperband"})
        spec = check_sweep_spec(config.sweep, config)
        assert trial_config(config, spec, {"r": 4}, name="s/0", output_dir=None).eval_steps == expected
        assert trial_config(config, spec, {"r": 4}, name="s-best", output_dir=None, pruning=False).eval_steps == 0
    config = RunConfig.parse(name="s", data="demo", steps=40, eval_steps=3, sweep={"r": [4], "pruner": "median"})
    assert trial_config(config, check_sweep_spec(config.sweep, config), {"r": 4}, name="s/0",
                        output_dir=None).eval_steps == 3


def test_a_list_valued_choice_is_stored_as_text_and_given_back_as_a_list():
    config = RunConfig.parse(name="s", data="demo", sweep={"target_modules": [["q_proj", "v_proj"], "all-linear"]})
    [dimension] = check_sweep_spec(config.sweep, config).dimensions
    assert dimension.encoded() == ['["q_proj", "v_proj"]', "all-linear"]
    assert dimension.decode('["q_proj", "v_proj"]') == ["q_proj", "v_proj"]


def test_trials_default_to_the_grid_and_the_sampler_to_grid_for_lists_only():
    config = RunConfig.parse(name="s", data="demo")
    grid = check_sweep_spec({"r": [4, 8, 16], "dropout": [0.0, 0.1]}, config)
    assert (grid.sampler, grid.trials, grid.grid_size, grid.optimize, grid.direction) == (
        "grid", 6, 6, "eval_loss", "minimize")
    some = check_sweep_spec({"r": [4, 8, 16], "dropout": [0.0, 0.1], "sampler": "grid", "trials": 4}, config)
    assert some.trials == 4  # said so: 4 of the grid's 6 points
    tpe = check_sweep_spec({"lr": {"log_uniform": [1e-4, 1e-2]}, "optimize": {"exact_match": "max"}}, config)
    assert (tpe.sampler, tpe.trials, tpe.optimize, tpe.direction) == ("tpe", 10, "exact_match", "maximize")


# ------------------------------------------------------------------ refused before any weight loads
BAD = [
    ({}, {}, "declares no setting to search"),
    ({"trials": 3}, {}, "declares no setting to search"),
    ([1, 2], {}, "maps settings to the values to try"),
    ({"lrr": [1e-3]}, {}, r"`sweep.lrr` is neither .* Did you mean `lr`\?"),
    ({"alpah": [8]}, {}, r"Did you mean `alpha`\?"),
    ({"lr": {"loguniform": [1e-4, 1e-3]}}, {}, r"distribution `loguniform`.* Did you mean `log_uniform`\?"),
    ({"lr": {"uniform": [1e-3]}}, {}, "takes two numbers"),
    ({"lr": {"uniform": [1e-3, 1e-4]}}, {}, "low must be below high"),
    ({"lr": {"log_uniform": [0, 1e-3]}}, {}, "a log scale starts above 0"),
    ({"lr": {"uniform": [1e-3, 2.0]}}, {}, r"`sweep.lr`: `lr` is 2.0, outside its range"),
    ({"data": {"uniform": [0, 1]}}, {}, "`data` is not a number setting"),
    ({"init": {"uniform": [0, 1]}}, {}, "`init` is not a number setting"),
    ({"r": [0, 8]}, {}, r"`sweep.r`: `r` is 0, outside its range"),
    ({"r": {"int": [1.5, 8]}}, {}, "must be whole numbers"),
    ({"r": [4, 4]}, {}, "lists 4 twice"),
    ({"r": 8}, {}, "is one value"),
    ({"name": ["a", "b"]}, {}, "`name` cannot be searched"),
    ({"r": [4], "optimize": {"exact_match": "max"}}, {}, "report exact_match only when `metric` names it"),
    ({"r": [4], "optimize": "perplexity"}, {}, "add it to `metric`"),
    ({"r": [4], "optimize": "eval_loss"}, {"eval_split": 0.0}, "no evaluation data"),
    ({"r": [4], "optimize": "accuracy"}, {}, "no trial reports 'accuracy'"),
    ({"r": [4], "optimize": {"eval_loss": "lowest"}}, {}, "the direction is min or max"),
    ({"r": [4], "objective": {"eval_loss": "min"}}, {}, r"^`sweep.objective` is now `sweep.optimize`"),
    ({"r": [4], "trials": 0}, {}, r"`sweep.trials: 0` runs nothing"),
    ({"r": [4, 8], "dropout": [0.0, 0.1], "trials": 3}, {}, "fewer than the grid's 4 points"),
    ({"r": [4, 8], "trials": 3}, {}, "more than the grid's 2 points"),
    ({"lr": {"uniform": [1e-4, 1e-3]}, "sampler": "grid"}, {}, "takes lists only"),
    ({"r": [4], "sampler": "bayes"}, {}, "not one of grid, random, tpe"),
    ({"r": [4], "pruner": "median", "optimize": {"train_loss": "min"}}, {}, "judges trials by their eval_loss"),
    ({"r": [4], "pruner": "median"}, {"steps": None, "epochs": 1}, "set `eval_steps`"),
    ({"r": [4], "storage": "shared.db"}, {}, "an Optuna storage URL"),
    ({"r": [4], "keep_models": -1}, {}, "keep_models"),
    ({"method": ["lora", "ia3"], "r": [4, 8]}, {}, "option of lora but not of ia3"),
    ({"method": ["lora", "nope"]}, {}, "`sweep.method`"),
    ({"r": [4]}, {"cv": 3, "eval_split": 0.0}, "do not combine"),
    ({"method": ["lora", "full"]}, {"quantization": "4bit"}, r"`sweep.method: 'full'`: .*does not work with method"),
    ({"r": [4]}, {"name": "a/b"}, "has a '/'"),
]


@pytest.mark.parametrize("block, extra, match", BAD, ids=[m[:30] for _, _, m in BAD])
def test_a_bad_sweep_is_one_line_before_any_weight_loads(tiny_model_dir, demo_rows, no_loading, block, extra, match):
    config = {"model": str(tiny_model_dir), "data": demo_rows, "name": "s", **FAST, **extra, "sweep": block}
    with pytest.raises(ConfigError, match=match) as info:
        nbtune.finetune(config)
    assert "\n" not in str(info.value)
    assert not wb.WORKBENCH.bases and not nbtune.runs and not Path("runs/s").exists()


def test_unreadable_data_is_refused_before_the_study_opens(tiny_model_dir, no_loading):
    with pytest.raises(DataError):
        nbtune.finetune(model=str(tiny_model_dir), data="no-such-file.jsonl", name="s", **FAST, sweep={"r": [4]})
    assert not Path("runs/s").exists() and not wb.WORKBENCH.bases


def test_resume_from_is_refused_for_a_sweep(tiny_model_dir, demo_rows, no_loading):
    with pytest.raises(ConfigError, match="a sweep continues by itself"):
        nbtune.finetune(model=str(tiny_model_dir), data=demo_rows, name="s", **FAST, sweep={"r": [4]},
                        resume_from="latest")


# ------------------------------------------------------------------ the live panel, on a real sweep
def test_the_sweep_panel_follows_a_real_sweep(sweep_of):
    pytest.importorskip("ipywidgets")
    from nbtune.widgets.sweep_panel import SweepPanel

    panel = SweepPanel(interactive_stop=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NbtuneWarning)  # no observer call of the panel may fail
        sweep = sweep_of({"r": [4, 8]}, observers=[panel])
    assert "finished" in panel.status.value and "2 of 2 trials" in panel.status.value
    assert panel.table.value.count("<tr") == 3 and "★" in panel.table.value
    assert "s/1" in panel.trial.value and panel.stop_button.description == "Finished"
    assert math.isfinite(sweep.best["value"]) and panel.snapshot() == sweep_html(sweep)
    assert os.path.isfile("runs/s/study.db")
