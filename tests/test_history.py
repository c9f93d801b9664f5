"""`nbtune.history()`: every run saved under a folder, from any kernel; saved runs in `nbtune.compare`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import InterruptAt, finetune_interrupted, nbtune_shell

import nbtune
from nbtune.errors import NbtuneError
from nbtune.widgets.formatters import html_of

SETTINGS = {"steps": 4, "batch_size": 4, "lr": 1e-2, "metric": "none", "precision": "fp32"}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs save under ./runs, as in a notebook's folder
    return tmp_path


def _train_in_another_process(model_dir: Path, rows: list[dict], name: str) -> None:
    """A run trained and saved by another Python process: an earlier kernel."""
    Path("rows.json").write_text(json.dumps(rows))
    code = textwrap.dedent(f"""
        import json, nbtune
        nbtune.finetune(name={name!r}, model={str(model_dir)!r}, data=json.load(open("rows.json")), method="ia3",
                        **{SETTINGS!r})
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]


def test_history_lists_runs_saved_by_earlier_kernels_and_this_one(in_tmp, tiny_model_dir, demo_rows):
    _train_in_another_process(tiny_model_dir, demo_rows[:16], "yesterday")
    today = nbtune.finetune(name="today", model=str(tiny_model_dir), data=demo_rows[:16], **SETTINGS)
    saved = nbtune.history()
    rows = {row["name"]: row for row in saved.table()}
    assert list(rows) == ["today", "yesterday"]  # newest first
    assert rows["yesterday"]["method"] == "ia3" and rows["yesterday"]["status"] == "finished"
    assert rows["today"]["steps"] == "4/4" and rows["today"]["train_loss"] == today.metrics["train_loss"]
    assert rows["today"]["adapter_mb"] > 0 and rows["today"]["resume_from"] is None
    assert list(saved.df["name"]) == ["today", "yesterday"]
    assert "<table>" in html_of(saved) and "yesterday" in repr(saved)


def test_a_damaged_or_foreign_run_json_is_a_row_that_says_so(in_tmp, tiny_model_dir, demo_rows):
    nbtune.finetune(name="good", model=str(tiny_model_dir), data=demo_rows[:16], **SETTINGS)
    (in_tmp / "runs" / "broken").mkdir()
    (in_tmp / "runs" / "broken" / "run.json").write_text("{not json")
    (in_tmp / "runs" / "foreign").mkdir()
    (in_tmp / "runs" / "foreign" / "run.json").write_text(json.dumps({"hello": 1}))
    (in_tmp / "runs" / "not_a_run").mkdir()  # no run.json: not listed at all
    rows = {row["name"]: row for row in nbtune.history().table()}
    assert set(rows) == {"good", "broken", "foreign"}
    assert rows["broken"]["status"] == rows["foreign"]["status"] == "unreadable"
    assert "unreadable" in rows["broken"]["folder"] and "not one nbtune wrote" in rows["foreign"]["folder"]
    with pytest.raises(NbtuneError, match="no saved run 'broken'"):
        nbtune.history()["broken"]


def test_a_missing_root_is_one_clear_line(in_tmp):
    with pytest.raises(NbtuneError, match="there is no folder 'nowhere'"):
        nbtune.history("nowhere")


def test_an_interrupted_run_with_checkpoints_is_listed_as_resumable(in_tmp, tiny_model_dir, demo_rows):
    common = {**SETTINGS, "steps": 8, "checkpoint_steps": 2, "model": str(tiny_model_dir), "data": demo_rows[:16]}
    finetune_interrupted(name="died", observers=[InterruptAt(5)], **common)
    shutil.rmtree(in_tmp / "runs" / "died")  # as if the process had died: only its periodic checkpoints remain
    finetune_interrupted(name="stopped", observers=[InterruptAt(5)], **common)
    rows = {row["name"]: row for row in nbtune.history().table()}
    assert rows["died"]["status"] == "interrupted" and rows["died"]["resume_from"].endswith("checkpoint-5")
    assert rows["stopped"]["status"] == "stopped" and rows["stopped"]["resume_from"].endswith("checkpoint-5")
    resumed = nbtune.finetune(name="died", resume_from=rows["died"]["resume_from"], **common)
    assert resumed.status == "finished" and resumed.history[-1]["step"] == 8
    assert {row["name"]: row["status"] for row in nbtune.history().table()}["died"] == "finished"


def test_compare_takes_saved_runs_and_loads_one_only_for_answers(in_tmp, tiny_model_dir, demo_rows):
    common = {**SETTINGS, "model": str(tiny_model_dir), "data": demo_rows[:16]}
    earlier = nbtune.finetune(name="a", r=4, **common)
    earlier_answer = earlier.generate(demo_rows[0]["prompt"], max_new_tokens=4)
    nbtune.runs.clear()  # a new kernel: only the folder is left
    live = nbtune.finetune(name="a", r=8, **{**common, "output_dir": "runs/a_today"})
    assert nbtune.history()["a"].path.name == "a_today"  # by name: the newest run of that name
    row = next(saved for saved in nbtune.history() if saved.path.name == "a")
    cmp = nbtune.compare(live, "runs/a", row)
    names = [row["run"] for row in cmp.table()]
    assert names == ["a", "a (saved a)", "a (saved a, 2)"]
    saved = cmp.runs[1]
    assert saved.model is None and saved.history and cmp.config_diff()["r"] == dict(zip(names, [8, 4, 4], strict=True))
    assert cmp.curves()[names[1]]["loss"] == [h["loss"] for h in earlier.history if "loss" in h]
    assert "a (saved a, 2)" in html_of(cmp) and saved.model is None  # the table needs no weights
    answers = cmp.generations([demo_rows[0]["prompt"]], max_new_tokens=4)
    assert saved.model is not None and answers[0][names[1]] == earlier_answer


def test_finetune_runs_all_lists_the_folder(in_tmp, tiny_model_dir, demo_rows):
    nbtune.finetune(name="kept", model=str(tiny_model_dir), data=demo_rows[:16], **SETTINGS)
    with nbtune_shell(tiny_model_dir) as ip:
        listed = ip.run_line_magic("finetune_runs", "--all")
        elsewhere = ip.run_line_magic("finetune_runs", f"--all {in_tmp / 'runs'}")
    assert [s.name for s in listed] == [s.name for s in elsewhere] == ["kept"]
