"""Runs named `<sweep>/<trial>` (a sweep's trials, issue 21): they train, save to `runs/<sweep>/<trial>`,
load back, are listed by `nbtune.history()` beside the sweep's study, compare and export like any run."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import InterruptAt, finetune_interrupted, nbtune_shell

import nbtune
from nbtune.engine.records.history import saved_record
from nbtune.errors import ConfigError, NbtuneError
from nbtune.widgets.formatters import html_of

SETTINGS = {"steps": 2, "batch_size": 4, "metric": "none", "precision": "fp32"}


@pytest.fixture
def trial(tiny_model_dir, demo_rows):
    """Trial 0 of sweep `s`, trained and saved, with the sweep's study file beside it."""
    run = nbtune.finetune(name="s/0", model=str(tiny_model_dir), data=demo_rows, **SETTINGS)
    Path("runs/s/study.db").touch()  # what the sweep keeps beside its trials: no run, nor a broken one
    return run


def test_a_trial_trains_saves_into_its_sweeps_folder_and_loads_back_by_name(trial):
    assert trial.status == "finished" and trial.name == "s/0"
    assert Path(trial.metrics["saved_to"]) == Path("runs/s/0") and Path("runs/s/0/run.json").is_file()
    assert "/" not in trial.context.workdir.name  # its scratch folder is one folder, not a path into one
    assert nbtune.runs["s/0"] is trial
    loaded = nbtune.load("runs/s/0")
    assert loaded.name == "s/0" and loaded.config.resolved_output_dir == Path("runs/s/0")
    assert loaded.save() == Path("runs/s/0")  # saved again where it came from, not runs/0 or runs/s-0
    assert sorted(p.name for p in Path("runs").iterdir()) == ["s"]
    assert nbtune.load_run("runs/s/0").name == "s/0" and nbtune.runs["s/0"].saved_to == Path("runs/s/0")


def test_history_lists_trials_by_name_and_not_the_sweep_folder(trial, tiny_model_dir, demo_rows):
    nbtune.finetune(name="plain", model=str(tiny_model_dir), data=demo_rows, **SETTINGS)
    Path("runs/s/1").mkdir()
    Path("runs/s/1/run.json").write_text("{not json")  # a damaged trial is a row named as its folder
    saved = nbtune.history()
    rows = {row["name"]: row for row in saved.table()}
    assert set(rows) == {"s/0", "s/1", "plain"}  # no row for `s` itself (study.db and trials, no run.json)
    assert rows["s/0"]["status"] == "finished" and rows["s/0"]["steps"] == "2/2" and rows["s/0"]["adapter_mb"] > 0
    assert rows["s/1"]["status"] == "unreadable"
    assert saved["s/0"].path == Path("runs/s/0") and "s/0" in html_of(saved)
    assert saved_record(nbtune.history()["s/0"]).name == "s/0"
    assert saved_record("runs/s/0").config.resolved_output_dir == Path("runs/s/0")
    assert [s.name for s in nbtune.history("runs/s") if s.problem is None] == ["s/0"]  # the sweep's own folder
    with nbtune_shell(tiny_model_dir) as ip:
        assert {s.name for s in ip.run_line_magic("finetune_runs", "--all")} == set(rows)


def test_a_stopped_or_killed_trials_checkpoints_are_found_and_resume(tiny_model_dir, demo_rows):
    common = {**SETTINGS, "steps": 3, "checkpoint_steps": 1, "model": str(tiny_model_dir), "data": demo_rows}
    stopped = finetune_interrupted(name="s/1", observers=[InterruptAt(1)], **common)
    assert stopped.status == "stopped" and Path("runs/s/1-checkpoints/checkpoint-1").is_dir()
    Path("runs/s/study.db").touch()
    rows = {row["name"]: row for row in nbtune.history().table()}
    assert rows["s/1"]["status"] == "stopped" and rows["s/1"]["resume_from"].endswith("checkpoint-1")
    shutil.rmtree("runs/s/1")  # as if the process had died: only the trial's checkpoints remain
    rows = {row["name"]: row for row in nbtune.history().table()}
    assert set(rows) == {"s/1"} and rows["s/1"]["status"] == "interrupted"
    assert Path(rows["s/1"]["resume_from"]) == Path("runs/s/1-checkpoints/checkpoint-1")
    nbtune.runs.clear()  # a new kernel
    resumed = nbtune.finetune(name="s/1", resume_from="latest", **common)
    assert resumed.status == "finished" and resumed.history[-1]["step"] == 3
    assert nbtune.history()["s/1"].info["status"] == "finished"


def test_trials_compare_by_name_in_the_kernel_and_from_disk(trial, tiny_model_dir, demo_rows):
    other = nbtune.finetune(name="s/1", model=str(tiny_model_dir), data=demo_rows, r=4, **SETTINGS)
    cmp = nbtune.compare("s/0", "s/1")
    assert [row["run"] for row in cmp.table()] == ["s/0", "s/1"] and cmp.runs[1] is other
    assert "s/0" in html_of(cmp) and cmp.config_diff()["r"] == {"s/0": trial.config.options["r"], "s/1": 4}
    labelled = nbtune.compare("s/0", "runs/s/0")  # the saved one beside the kernel's says so, whole name
    assert [row["run"] for row in labelled.table()] == ["s/0", "s/0 (saved s/0)"]
    nbtune.runs.clear()  # a new kernel (or a sweep that kept no trial in memory): the names are under runs/
    from_disk = nbtune.compare("s/0", "s/1")
    assert [r.name for r in from_disk.runs] == ["s/0", "s/1"] and from_disk.runs[0].model is None
    with pytest.raises(NbtuneError, match="no run 's/9'"):
        nbtune.compare("s/9")


def test_a_trials_script_and_launch_files_are_flat_files_that_save_into_the_sweep(trial, demo_rows, tmp_path):
    from nbtune.engine.export.launch_files import write_launch_files

    script = trial.export_script()
    assert "cat > s-0.yaml" in script and "data: s-0.data.jsonl" in script
    assert script.rstrip().endswith("nbtune run s-0.yaml")
    body = script.rstrip().rsplit("\n", 1)[0]  # all but `nbtune run`: the files it writes, checked here
    done = subprocess.run(["bash", "-c", body], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    again = nbtune.RunConfig.parse((tmp_path / "s-0.yaml").read_text())
    assert again.name == "s/0" and again.resolved_output_dir == Path("runs/s/0") and again.data == "s-0.data.jsonl"
    written = write_launch_files(trial.config, tmp_path / "launch", processes=2, cpu=True)
    assert written["config"] == tmp_path / "launch" / "s-0.yaml" and written["config"].is_file()
    assert '"$HERE"/s-0.yaml' in written["script"].read_text()


def test_the_magic_takes_a_trial_name(tiny_model_dir, demo_rows):
    cell = "method: lora\nr: 4\ndata: {{ rows }}\nsteps: 1\nbatch_size: 4\nmetric: none\nsave: false\n"
    with nbtune_shell(tiny_model_dir, rows=demo_rows[:16]) as ip:
        run = ip.run_cell_magic("finetune", "s/2 --no-panel", cell)  # e.g. one trial trained again by hand
        import nbtune.engine.workbench as wb

        assert run.name == "s/2" and run.status == "finished" and wb.WORKBENCH.runs["s/2"] is run


@pytest.mark.parametrize("name", ["a/b/c", "/a", "a/", "a//b", "../a"])
def test_a_name_deeper_than_one_trial_is_refused(name):
    with pytest.raises(ConfigError, match="two such names joined by '/'"):
        nbtune.RunConfig.parse({"name": name})
