"""A sweep's study over time (issue 21, 29): shared with other processes, durable across re-runs, continued only
by the same sweep (a changed config starts a new study, the old kept beside it; in a shared storage it is
refused), and what trials rank on without evaluation data."""

from __future__ import annotations

import json
import socket
import warnings
from pathlib import Path

import optuna
import pytest

import nbtune
import nbtune.engine.workbench as wb
from nbtune.config import RunConfig
from nbtune.config.sweep_space import check_sweep_spec
from nbtune.engine.experiments import sweep_study
from nbtune.errors import ConfigError, NbtuneError, NbtuneWarning

FAST = {"steps": 2, "batch_size": 4, "lr": 1e-2, "metric": "none", "eval_split": 0.25}


@pytest.fixture
def sweep_of(tiny_model_dir, demo_rows):
    """nbtune.finetune of a sweep on the tiny model: FAST settings, then the test's keys."""

    def run(sweep, **config):
        return nbtune.finetune(**{"model": str(tiny_model_dir), "data": demo_rows, "name": "s", **FAST, **config},
                               sweep=sweep)

    return run


# ------------------------------------------------------------------ shared and durable studies
def test_a_shared_study_counts_other_processes_trials_and_takes_back_dead_ones(sweep_of, tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    block = {"r": [2, 4, 8], "trials": 3, "sampler": "random", "storage": url}
    config = RunConfig.parse(model="m", data=[{"prompt": "a", "completion": "b"}] * 8, name="s", **FAST, sweep=block)
    spec = check_sweep_spec(block, config)
    study = sweep_study.open_study(config, spec)
    elsewhere = study.ask()  # a trial another machine runs: it counts
    elsewhere.set_user_attr("owner", "another-host:1")
    elsewhere.suggest_categorical("r", [2, 4, 8])
    dead = study.ask()  # a trial of a process of this machine that died: taken back, its params tried again
    dead.set_user_attr("owner", f"{socket.gethostname()}:{_dead_pid()}")
    dead_r = dead.suggest_categorical("r", [2, 4, 8])

    sweep = sweep_of(block)
    assert [r["number"] for r in sweep.records] == [2, 3] and sweep.records[0]["params"]["r"] == dead_r
    assert sweep.ran_here == [2, 3]
    states = [t.state.name for t in optuna.load_study(study_name="s", storage=url).trials]
    assert states == ["RUNNING", "FAIL", "COMPLETE", "COMPLETE"] and sweep.status == "finished"
    assert not Path("runs/s/study.db").exists()


def _dead_pid():
    import psutil

    pid = 99999
    while psutil.pid_exists(pid):
        pid += 1
    return pid


def test_a_sweep_run_again_with_other_steps_starts_a_new_study_and_keeps_the_old(sweep_of, demo_rows, loads):
    """Issue 29 item 3: the same cell with `steps: 3` instead of 2 continued the 2-step study: its trials were
    judged against the old ones and "best" stayed an old-config trial, without a word."""
    first = sweep_of({"r": [4, 8]})
    assert first.status == "finished" and nbtune.sweeps["s"] is first
    twin = sweep_of({"r": [4, 8]})  # the same cell again: the same study, a second Sweep of it
    assert twin.ran_here == [] and nbtune.sweeps["s"] is twin
    with pytest.warns(NbtuneWarning) as said:
        again = sweep_of({"r": [4, 8]}, steps=3)
    [line] = [str(w.message) for w in said if "changed since its study" in str(w.message)]
    assert line == ("sweep 's' changed since its study (steps: 2 → 3): a new study starts; the old one and its 2 "
                    "trials are kept in 'runs/s~1'.")
    assert again.status == "finished" and again.ran_here == [0, 1] and nbtune.sweeps["s"] is again
    assert all(again.runs[n].config.steps == 3 and again.runs[n].history[-1]["step"] == 3 for n in (0, 1))
    assert again.best_run.config.steps == 3 and nbtune.runs["s/0"] is again.runs[0]
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{Path('runs/s/study.db').resolve()}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 2
    # the old study and its trials, kept whole beside it; the earlier Sweep says where, and does not resume
    kept = optuna.load_study(study_name="s", storage=f"sqlite:///{Path('runs/s~1/study.db').resolve()}")
    assert len(kept.trials) == 2 and json.loads(Path("runs/s~1/1/run.json").read_text())["config"]["steps"] == 2
    assert first.runs[0].saved_to == Path("runs/s~1/0") and first.runs[0].owns_saved_folder()
    with pytest.raises(NbtuneError, match=r"set aside .* kept in 'runs/s~1'"):
        twin.resume()
    with pytest.raises(NbtuneError, match=r"^sweep 's': its study is gone from 'runs/s' or is now another sweep's"):
        first.resume()  # an earlier Sweep of it: the study in its place is not its own
    assert len(kept.trials) == 2
    # unchanged, it continues (nothing left to train, or the trials asked for more: notebook 08's last cell)
    assert sweep_of({"r": [4, 8]}, steps=3).ran_here == [] and len(loads) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", NbtuneWarning)
        more = nbtune.finetune(again.config, sweep={**again.config.sweep, "sampler": "grid", "trials": 2})
    assert more.ran_here == [] and len(more.records) == 2
    # changed again: the next place is ~2
    with pytest.warns(NbtuneWarning, match=r"\(data: other rows \(train 24 → 9 rows, eval 8 → 3 rows\)\).*'runs/s~2'"):
        sweep_of({"r": [4, 8]}, steps=3, data=demo_rows[:12])


def test_what_a_stored_study_must_match_and_how_a_change_is_named(tiny_model_dir, demo_rows):
    from nbtune.engine.experiments.sweep_config import changes, fixed_settings, said_briefly, study_fingerprint

    def fingerprint(block, data=None, **config):
        parsed = RunConfig.parse(**{"model": str(tiny_model_dir), "data": demo_rows, "name": "s", **FAST, **config,
                                    "sweep": block})
        return study_fingerprint(parsed, check_sweep_spec(block, parsed), data)

    base = fingerprint({"r": [4, 8], "lr": [1e-3, 1e-2]})
    assert "lr" not in base["settings"] and "r" not in base["settings"]  # swept: each trial's own
    assert base["settings"]["steps"] == 2 and "name" not in base["settings"]
    assert "precision" not in base["settings"]  # the machine's default: another GPU may share the study
    assert fingerprint({"r": [4, 8], "lr": [1e-3, 1e-2]}, precision="fp32")["settings"]["precision"] == "fp32"
    same = fingerprint({"r": [4, 8], "lr": [1e-3, 1e-2], "trials": 4, "keep_models": 1}, name="other",
                       save=False, output_dir="elsewhere", checkpoint_steps=5)
    assert changes(base, same) == []  # more trials, where it is kept, how it is saved: the same sweep
    assert changes(base, fingerprint({"r": [4, 16], "lr": [1e-3, 1e-2]}, batch_size=2)) == [
        "sweep.r: [4, 8] → [4, 16]", "batch_size: 4 → 2"]
    assert changes(base, fingerprint({"r": [4, 8], "lr": {"log_uniform": [1e-4, 1e-2]}})) == [
        "sweep.sampler: grid → tpe", "sweep.lr: [0.001, 0.01] → {log_uniform: [0.0001, 0.01]}"]
    assert changes(base, fingerprint({"r": [4, 8]})) == ["sweep.lr: [0.001, 0.01] → (not swept)", "lr: unset → 0.01"]
    assert said_briefly(["a", "b", "c", "d", "e"]) == "a; b; c; and 2 more"
    # an earlier nbtune stored the metric as `objective`: the same sweep, and a changed metric named as now
    earlier = {("objective" if k == "optimize" else k): v for k, v in base.items()}
    assert "optimize" not in earlier and changes(earlier, base) == []
    assert changes(earlier, fingerprint({"r": [4, 8], "lr": [1e-3, 1e-2], "optimize": {"final_loss": "min"}})) == [
        "sweep.optimize: eval_loss → final_loss"]
    older = {k: v for k, v in base.items() if k not in ("settings", "pruner")}  # a study an older nbtune made
    assert changes(older, fingerprint({"r": [4, 8], "lr": [1e-3, 1e-2]}, steps=9)) == []
    rows = {"format": "prompt_completion", "train": {"rows": 12, "sha256": "a"}, "eval": None}
    config = RunConfig.parse(data="one.jsonl", eval_data="two.jsonl", name="s", sweep={"r": [4]})
    assert fixed_settings(config, check_sweep_spec(config.sweep, config), rows)["data"] == rows
    assert "eval_data" not in fixed_settings(config, check_sweep_spec(config.sweep, config), rows)


def test_a_changed_sweep_in_a_shared_storage_is_refused_naming_the_change(sweep_of, tmp_path, no_loading):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    study = optuna.create_study(study_name="s", storage=url)
    # as an earlier nbtune stored it: the metric under `objective` (now `optimize`), still compared as such
    stored = {"space": {"r": ["choice", [4, 8]]}, "objective": "eval_loss", "direction": "minimize",
              "sampler": "grid", "pruner": "none"}
    study.set_user_attr(sweep_study.FINGERPRINT, stored)
    study.enqueue_trial({"r": 4})  # one trial: another machine's, say
    with pytest.raises(ConfigError, match=r"^sweep 's' changed since its study in sqlite:.*shared.db \(sweep.r: "
                       r"\[4, 8\] → \[4, 16\]\), which other processes may share: set it back, give the sweep "
                       r"another `name`, or delete that study") as info:
        sweep_of({"r": [4, 16], "storage": url})
    assert "\n" not in str(info.value) and not wb.WORKBENCH.bases and not nbtune.runs
    assert len(optuna.load_study(study_name="s", storage=url).trials) == 1


def test_a_sweep_named_like_a_saved_run_is_refused_and_the_run_kept(tiny_model_dir, demo_rows, no_loading):
    # Saving that run again would replace its folder, and with it the sweep's trials and study.
    Path("runs/s").mkdir(parents=True)
    Path("runs/s/run.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"holds a saved run named 's'.*give the sweep another name") as info:
        nbtune.finetune(model=str(tiny_model_dir), data=demo_rows, name="s", **FAST, sweep={"r": [4]})
    assert info.value.field == "name"
    assert sorted(p.name for p in Path("runs/s").iterdir()) == ["run.json"]


def test_a_sweep_without_evaluation_data_ranks_trials_on_final_loss(sweep_of):
    """Issue 29 item 9: without held-out rows a sweep ranks on the mean loss of the last 10% of steps, not one
    noisy step (the default was eval_loss, refused for want of evaluation data); the others on request."""
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(8)]
    config = RunConfig.parse(name="s", data=rows)
    spec = check_sweep_spec({"r": [4, 8]}, config)
    assert (spec.optimize, spec.direction) == ("final_loss", "minimize")
    for metric in ("final_loss", "train_loss", "last_loss", {"last_loss": "min"}):
        spec = check_sweep_spec({"r": [4, 8], "optimize": metric}, config)
        assert spec.direction == "minimize" and spec.optimize in str(metric)
    with pytest.raises(ConfigError, match=r"no evaluation data .* or rank on the training loss \(`optimize: "
                       r"final_loss`"):
        check_sweep_spec({"r": [4, 8], "optimize": "eval_loss"}, config)
    with pytest.raises(ConfigError, match=r"`sweep.pruner: median` .* no evaluation data; set `eval_split`"):
        check_sweep_spec({"r": [4, 8], "pruner": "median"}, RunConfig.parse(name="s", data=rows, steps=5))
    sweep = sweep_of({"lr": [1e-3, 1e-2]}, eval_split=0.0, steps=3)
    assert sweep.optimize == "final_loss" and list(sweep.trials.columns)[3] == "final_loss"
    assert [r["value"] for r in sweep.records] == [sweep.runs[n].metrics["final_loss"] for n in (0, 1)]
    assert sweep.best["value"] == min(run.metrics["final_loss"] for run in sweep.runs.values())


def test_a_process_that_loses_the_race_to_create_the_study_file_opens_it_again(tmp_path, monkeypatch):
    """Two processes starting one sweep both stamp a new SQLite file's schema version; the second gets an
    IntegrityError (seen in CI), and must open the file the first made instead of failing."""
    import optuna
    import sqlalchemy.exc

    real, calls = optuna.storages.RDBStorage, []

    def racing(url, **kwargs):
        calls.append(url)
        if len(calls) == 1:
            raise sqlalchemy.exc.IntegrityError("INSERT INTO alembic_version", {}, Exception("UNIQUE"))
        return real(url, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert isinstance(sweep_study._storage(url), real) and calls == [url, url]
