"""What a researcher must be able to trust across a kernel session: every run is one of `nbtune.runs` and
trains on the cached base, interrupts stop loops, the base column is the base, a replaced run says so,
reclaiming a stopped run keeps it resumable, in-memory data survives `to_yaml` and the picker's cell, and
a background run stops and is waited for, every time."""

from __future__ import annotations

import random
import threading
import time

import pytest

import nbtune
from nbtune.engine.evaluation.generation import generate_texts
from nbtune.engine.training.events import NullObserver

FAST = {"steps": 3, "batch_size": 4, "metric": "none", "save": False}


class StopAt(NullObserver):
    def __init__(self, step, interrupt=False):
        self.step, self.interrupt = step, interrupt

    def on_step(self, run, record):
        if record["step"] == self.step:
            if self.interrupt:
                raise KeyboardInterrupt  # what the kernel's interrupt does in the training thread
            run.stop()


# ---------------------------------------------------------------- every run is one of nbtune.runs (item 6)
def test_a_python_call_joins_nbtune_runs_and_trains_on_the_cached_base(tiny_model_dir, demo_rows, monkeypatch):
    import nbtune.engine.workbench as wb

    loads = []
    real = wb.load_base
    monkeypatch.setattr(wb, "load_base", lambda *a, **k: loads.append(a) or real(*a, **k))
    common = {**FAST, "model": str(tiny_model_dir), "data": demo_rows}
    first = nbtune.finetune(common, name="api-a")
    second = nbtune.finetune(common, name="api-b", method="ia3")
    assert nbtune.runs["api-a"] is first and nbtune.runs["api-b"] is second
    assert len(loads) == 1  # the second call trained on the base the first loaded
    assert [row["holder"] for row in nbtune.ledger() if row["kind"] != "process"][-2:] == ["api-a", "api-b"]
    assert nbtune.compare("api-a", "api-b").table()[1]["method"] == "ia3"
    nbtune.reclaim("api-a")
    assert first.model is None


def test_a_python_call_is_refused_while_a_background_run_trains(tiny_model_dir, demo_rows):
    common = {**FAST, "model": str(tiny_model_dir), "data": demo_rows}
    long = nbtune.finetune(common, name="long", steps=500, background=True)
    try:
        with pytest.raises(nbtune.NbtuneError, match="still training in the background"):
            nbtune.finetune(common, name="beside")
    finally:
        long.stop()
        long.wait(60)
    assert "beside" not in nbtune.runs


def test_a_base_passed_in_is_trained_and_the_run_still_joins_nbtune_runs(llama_base, demo_rows):
    run = nbtune.finetune(data=demo_rows, base=llama_base, name="given", **FAST)
    assert nbtune.runs["given"] is run and run.model.base_model.model is llama_base[0]


# ---------------------------------------------------------------- an interrupt stops a loop of runs (item 2)
def test_an_interrupt_keeps_the_stopped_run_and_stops_a_loop_of_runs(llama_base, demo_rows):
    trained = []
    with pytest.raises(KeyboardInterrupt) as info:
        for name in ("one", "two"):
            trained.append(nbtune.finetune(data=demo_rows, base=llama_base if name == "one" else None,
                                           name=name, observers=[StopAt(2, interrupt=True)],
                                           **{**FAST, "steps": 6}))
    assert trained == []  # the interrupt left the loop
    assert isinstance(info.value, nbtune.errors.RunInterrupted) and info.value.run is nbtune.runs["one"]
    assert "run 'one' stopped at step 2 of 6" in str(info.value) and "resume" in str(info.value)
    one = nbtune.runs["one"]
    assert one.status == "stopped" and len(one.history) == 2 and one.model is not None
    assert "two" not in nbtune.runs


def test_an_interrupt_before_the_first_step_trains_nothing_and_keeps_the_earlier_run(tiny_model_dir, demo_rows,
                                                                                     monkeypatch):
    import nbtune.data

    common = {**FAST, "model": str(tiny_model_dir), "data": demo_rows, "name": "same"}
    earlier = nbtune.finetune(common)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(nbtune.data, "tokenize_dataset", interrupted)  # the objective's tokenising step
    with pytest.raises(nbtune.errors.RunInterrupted, match="before its first step"):
        nbtune.finetune(common)
    assert nbtune.runs["same"] is earlier and earlier.model is not None


# ---------------------------------------------------------------- the base column is the base (item 3)
def test_the_base_column_is_the_unmodified_base_beside_a_4bit_run(tiny_model_dir, demo_rows):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common = {**FAST, "model": str(tiny_model_dir), "data": demo_rows, "precision": "fp32", "lr": 1e-2}
    nbtune.finetune(common, name="q", method="qlora")
    nbtune.finetune(common, name="l", method="lora")
    prompts = ["Convert this date to ISO format (YYYY-MM-DD): 9 Nov 1989", "hello"]
    reference = generate_texts(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                               AutoTokenizer.from_pretrained(tiny_model_dir), prompts, max_new_tokens=8)
    for order in (("q", "l"), ("l", "q"), ("q",)):
        rows = nbtune.compare(*order).generations(prompts, max_new_tokens=8)
        assert [row["base"] for row in rows] == reference, order


# ---------------------------------------------------------------- a replaced run says so (item 5)
def test_a_replaced_run_does_not_point_to_the_folder_its_successor_overwrote(tiny_model_dir, demo_rows):
    common = {**FAST, "model": str(tiny_model_dir), "data": demo_rows, "save": True, "name": "x"}
    old = nbtune.finetune(common, r=8)
    new = nbtune.finetune(common, r=4)
    assert old.saved_to == new.saved_to
    with pytest.raises(nbtune.NbtuneError) as info:
        old.generate("hi")
    assert "load_run" not in str(info.value) and "now holds that newer run" in str(info.value)
    nbtune.reclaim("x")
    with pytest.raises(nbtune.NbtuneError, match=r"load it back with nbtune\.load_run"):
        new.generate("hi")  # its own folder: loading it back is the right advice
    assert nbtune.load_run(new.saved_to).config.options["r"] == 4


# ---------------------------------------------------------------- reclaim keeps a stopped run resumable (item 7)
def test_a_reclaimed_stopped_run_resumes_exactly(tiny_model_dir, demo_rows):
    common = {**FAST, "model": str(tiny_model_dir), "data": demo_rows, "steps": 6, "dropout": 0.0, "lr": 1e-2}
    whole = nbtune.finetune(common, name="whole")
    part = nbtune.finetune(common, name="part", observers=[StopAt(2)])
    assert part.status == "stopped"
    nbtune.reclaim("part")
    assert part.model is None
    part.resume()
    assert part.status == "finished" and [r["step"] for r in part.history] == list(range(1, 7))
    assert [r["loss"] for r in part.history] == pytest.approx([r["loss"] for r in whole.history], abs=1e-4)


def test_a_stopped_run_that_cannot_resume_says_why_without_contradiction(llama_base, demo_rows):
    run = nbtune.finetune(data=demo_rows, base=llama_base, name="mem", observers=[StopAt(2)], **{**FAST, "steps": 6})
    nbtune.reclaim("mem")
    with pytest.raises(nbtune.NbtuneError) as info:
        run.resume()
    message = str(info.value)
    assert "only a stopped run" not in message and "passed in memory" in message and "resume_from" in message


# ---------------------------------------------------------------- in-memory data survives as text (item 10)
def test_to_yaml_of_a_dataframe_run_is_a_config_that_trains_the_same_rows(tiny_model_dir, demo_rows, tmp_path):
    import pandas as pd

    from nbtune.cli import main

    frame = pd.DataFrame(demo_rows[:8])
    run = nbtune.finetune(model=str(tiny_model_dir), data=frame, name="framed", **{**FAST, "steps": 1})
    text = run.to_yaml()
    assert "DataFrame" not in text
    config = nbtune.RunConfig.parse(text)
    assert config.data == demo_rows[:8]
    (tmp_path / "again.yaml").write_text(text, encoding="utf-8")
    assert main(["run", str(tmp_path / "again.yaml")]) == 0


def test_the_pickers_cell_names_the_notebook_variable_or_carries_the_rows(tiny_model_dir, demo_rows):
    import pandas as pd
    from conftest import nbtune_shell

    frame = pd.DataFrame(demo_rows[:8])
    with nbtune_shell(tiny_model_dir, frame=frame) as ip:
        body = "r: 4\nsteps: 1\nbatch_size: 2\nmetric: none\nsave: false\n"
        assert ip.run_cell(f"%%finetune framed --no-panel --data {{{{ frame }}}}\n{body}").success
        text = nbtune.picker("framed").cell_text()
        assert "data: {{ frame }}" in text
        again = ip.run_cell(text.replace("%%finetune framed", "%%finetune again --no-panel", 1))
        assert again.success and again.result.config.data is frame
        nbtune.finetune(model=str(tiny_model_dir), data=demo_rows[:4], name="listed", **{**FAST, "steps": 1})
        form = nbtune.picker("listed")
        assert form.config().data == demo_rows[:4] and "in memory" in form.common["data"].value
        text = form.cell_text()
        assert ip.run_cell(text.replace("%%finetune listed", "%%finetune listed2 --no-panel", 1)).success
        assert nbtune.runs["listed2"].config.data == demo_rows[:4]


# ---------------------------------------------------------------- smaller ones (item 12)
def test_the_ledger_says_a_run_still_loading_is_loading(tiny_model_dir, demo_rows):
    from nbtune.engine.records.run import set_status
    from nbtune.engine.training.pipeline import start_run
    from nbtune.engine.workbench import WORKBENCH

    run = start_run({**FAST, "model": str(tiny_model_dir), "data": demo_rows, "name": "arriving"})
    set_status(run, "running")
    WORKBENCH.runs["arriving"] = run
    assert [row for row in nbtune.ledger() if row["kind"] != "process"][-1] == {"holder": "arriving",
                                                                                 "kind": "loading", "mb": 0.0}


def test_a_data_error_found_while_tokenising_leaves_no_failed_run(tiny_model_dir, demo_rows, capsys):
    from conftest import nbtune_shell

    with nbtune_shell(tiny_model_dir, rows=demo_rows) as ip:
        body = "data: {{ rows }}\nmax_length: 8\nsteps: 2\nmetric: none\nsave: false\n"
        assert not ip.run_cell(f"%%finetune cut --no-panel\n{body}").success
        assert "has an answer left" in capsys.readouterr().err
        assert "cut" not in nbtune.runs  # as for every other data error: no `failed 0/0` run left behind


def test_nbtunes_warnings_show_as_one_line_in_a_notebook(tiny_model_dir, capsys):
    from conftest import nbtune_shell

    with nbtune_shell(tiny_model_dir) as ip:
        ip.run_cell("import warnings\nfrom nbtune.errors import NbtuneWarning\n"
                    "warnings.warn('the run diverged', NbtuneWarning)\nwarnings.warn('other', UserWarning)")
        err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert any(line.endswith("nbtune: warning: the run diverged\x1b[0m") for line in lines)
    assert not any("diverged" in line and ".py" in line for line in lines)  # no internal path, no source line
    assert not any("other" in line for line in lines)  # other warnings go where they went (here: to pytest)


def test_stop_then_wait_always_returns(tiny_model_dir, demo_rows):
    """Many background runs stopped at random moments (loading, first step, mid-run, right after a
    resume), each waited for with a timeout; on a hang every thread's stack is in the failure."""
    common = {**FAST, "model": str(tiny_model_dir), "data": demo_rows, "steps": 400}
    chance = random.Random(0)
    for cycle in range(12):
        run = nbtune.finetune(common, name=f"cycle{cycle % 3}", background=True)
        time.sleep(chance.choice([0.0, 0.05, 0.3, 1.0]))
        run.stop()
        _wait_or_dump(run, f"cycle {cycle}")
        if run.status == "stopped" and run.checkpoint:
            nbtune.engine.workbench.WORKBENCH.resume(run.name, background=True)
            run.stop()  # at once, as a user pressing Stop right after resuming
            _wait_or_dump(run, f"cycle {cycle}, after resume")
            assert run.status == "stopped", f"cycle {cycle}: the Stop after resume was lost ({len(run.history)})"


def _wait_or_dump(run, what):
    run.wait(60)
    if run.training_in_background:
        frames = "\n".join(f"--- {t.name}\n{_stack(t)}" for t in threading.enumerate())
        run.stop()
        pytest.fail(f"{what}: run.wait(60) did not return ({run.status}, {len(run.history)} steps)\n{frames}")


def _stack(thread):
    import sys
    import traceback

    frame = sys._current_frames().get(thread.ident)
    return "".join(traceback.format_stack(frame)) if frame is not None else "(no frame)"
