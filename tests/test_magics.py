"""The notebook layer in a real IPython shell: %load_ext, %%finetune, templating, config, idempotent
re-runs on a cached base, errors as one line, background runs and Stop."""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch
from conftest import logits_of, nbtune_shell

import nbtune
from nbtune.engine.workbench import shared_view

CELL = "method: lora\nr: 4\ndata: {{ rows }}\nsteps: 3\nbatch_size: 4\nmetric: none\nsave: false\n"


@pytest.fixture
def ip(tiny_model_dir, demo_rows):
    """A real InteractiveShell with nbtune loaded, a fresh workbench, and `rows` in the namespace."""
    with nbtune_shell(tiny_model_dir, rows=demo_rows[:16]) as shell:
        yield shell


def runs():
    import nbtune.engine.workbench as wb

    return wb.WORKBENCH.runs


def finetune(ip, line, cell=CELL):
    return ip.run_cell_magic("finetune", line + " --no-panel", cell)


def failing(ip, line, cell=CELL, *, magic="%%finetune"):
    """Run the cell as a notebook does; it must end in error (Run All stops there): returns that error."""
    source = f"{magic} {line} --no-panel" + (f"\n{cell}" if magic == "%%finetune" else "")
    result = ip.run_cell(source)
    assert not result.success, "the cell should have failed"
    return result.error_in_exec


def test_load_ext_registers_the_magics_and_unload_removes_them(ip):
    assert "finetune" in ip.magics_manager.magics["cell"] and "finetune" in ip.magics_manager.magics["line"]
    assert "finetune_runs" in ip.magics_manager.magics["line"]
    ip.run_line_magic("unload_ext", "nbtune")
    assert "finetune" not in ip.magics_manager.magics["cell"]
    ip.run_line_magic("load_ext", "nbtune")
    assert "finetune" in ip.magics_manager.magics["cell"]


def test_the_help_is_generated_from_the_arguments():
    from nbtune.magics.finetune import Finetune

    doc = Finetune.finetune.__doc__
    for flag in ("--model", "--method", "--steps", "--dry-run", "--background", "--no-panel"):
        assert flag in doc


def test_a_cell_trains_stores_and_returns_the_run(ip):
    run = finetune(ip, "first")
    assert isinstance(run, nbtune.Run) and run.status == "finished" and len(run.history) == 3
    assert runs()["first"] is run
    assert "first" in repr(ip.run_line_magic("finetune_runs", ""))
    ip.run_cell("%%finetune second --no-panel\n" + CELL)
    assert ip.user_ns["_"] is runs()["second"]  # `r = _` works


def test_rerunning_a_cell_replaces_its_run_and_never_stacks_adapters(ip):
    first = finetune(ip, "same")
    again = finetune(ip, "same")
    assert [r["loss"] for r in first.history] == [r["loss"] for r in again.history]
    assert list(runs()) == ["same"] and runs()["same"] is again and first.model is None
    base = next(iter(runs_bases(ip).values())).model
    assert not any("lora" in n for n, _ in base.named_parameters())  # the cached base stays pristine
    loras = [n for n, _ in again.model.named_modules() if n.endswith("lora_A")]
    assert loras and not any("base_layer.base_layer" in n for n, _ in again.model.named_modules())


def runs_bases(ip):
    import nbtune.engine.workbench as wb

    return wb.WORKBENCH.bases


def test_changing_the_config_and_rerunning_applies_the_change(ip):
    small = finetune(ip, "grow").metrics["trainable_params"]
    big = finetune(ip, "grow", CELL.replace("r: 4", "r: 8")).metrics["trainable_params"]
    assert big == 2 * small


def test_the_second_run_reuses_the_loaded_base(ip, monkeypatch):
    finetune(ip, "a")
    import nbtune.engine.workbench as wb

    monkeypatch.setattr(wb, "load_base", lambda *a, **k: pytest.fail("the base was loaded again"))
    assert finetune(ip, "b").status == "finished"


def test_runs_share_the_base_weights_instead_of_copying_them(ip):
    a, b = finetune(ip, "a"), finetune(ip, "b")
    weight = "model.layers.0.mlp.down_proj.weight"
    pa = dict(a.model.named_parameters())[f"base_model.model.{weight}".replace("down_proj.", "down_proj.base_layer.")]
    pb = dict(b.model.named_parameters())[f"base_model.model.{weight}".replace("down_proj.", "down_proj.base_layer.")]
    assert pa.data_ptr() == pb.data_ptr()


def test_a_method_that_trains_base_weights_gets_its_own_copy(ip):
    finetune(ip, "lora-first")
    base = next(iter(runs_bases(ip).values())).model
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    full = finetune(ip, "full", CELL.replace("method: lora\nr: 4", "method: full"))
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())
    assert not all(torch.equal(p, before[n]) for n, p in full.model.named_parameters())


@pytest.mark.parametrize(("cell", "expected"), [
    ("steps: {{ n }}", {"steps": 7}),
    ("name: run-{{ n }}", {"name": "run-7"}),
    ("data: {{ frame }}", "frame"),
])
def test_templating_pulls_plain_names_from_the_namespace(cell, expected):
    import pandas as pd

    from nbtune.magics.parse import parse_cell

    frame = pd.DataFrame({"prompt": ["a"], "completion": ["b"]})
    parsed = parse_cell(cell, {"n": 7, "frame": frame})
    assert parsed["data"] is frame if expected == "frame" else parsed == expected


@pytest.mark.parametrize(("cell", "match"), [
    ("data: {{ __import__('os').system('echo hi') }}", "plain variable name"),
    ("data: {{ rows[0] }}", "plain variable name"),
    ("data: {{ missing }}", "no variable 'missing'"),
    ("data: {{ rows", "unclosed"),
    ("method: [lora", "not valid YAML"),
    ("- a\n- b", "key: value"),
    ("data: !!python/object/apply:os.system ['echo hi']", "not valid YAML"),
])
def test_bad_cells_give_one_red_line_and_keep_earlier_runs(ip, capsys, cell, match):
    kept = finetune(ip, "kept")
    capsys.readouterr()
    assert isinstance(failing(ip, "broken", cell), nbtune.NbtuneError)
    err = capsys.readouterr().err.strip()
    assert match in err and err.count("\n") == 0 and "Traceback" not in err
    assert runs()["kept"] is kept and "broken" not in runs()


def test_config_errors_name_the_field(ip, capsys):
    assert failing(ip, "bad", CELL.replace("r: 4", "rr: 4")).field == "rr"
    assert "Did you mean `r`?" in capsys.readouterr().err


def test_config_defaults_come_from_pyproject_then_config_then_cell_then_flags(ip, tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("[tool.nbtune]\nsteps = 2\nbatch_size = 2\nr = 2\n")
    monkeypatch.chdir(tmp_path)
    run = finetune(ip, "layers", "data: {{ rows }}\nmetric: none\nsave: false\nr: 4\n")
    assert len(run.history) == 2 and run.config.batch_size == 2 and run.config.options["r"] == 4
    model = runs()["layers"].config.model
    ip.run_line_magic("config", f"Finetune.defaults = {{'model': {model!r}, 'steps': 1}}")
    assert len(finetune(ip, "layers", "data: {{ rows }}\nmetric: none\nsave: false\n").history) == 1
    assert len(finetune(ip, "layers --steps 3", "data: {{ rows }}\nmetric: none\nsave: false\n").history) == 3


def test_a_higher_layer_may_change_the_kind_of_length_and_other_methods_options_stay_out(ip, tmp_path, monkeypatch,
                                                                                       capsys):
    (tmp_path / "pyproject.toml").write_text("[tool.nbtune]\nsteps = 2\nbatch_size = 2\nr = 2\n")
    monkeypatch.chdir(tmp_path)
    run = finetune(ip, "by-epochs", "data: {{ rows }}\nmetric: none\nsave: false\nepochs: 0.25\n")
    assert run.config.steps is None and run.config.epochs == 0.25 and len(run.history) == 2  # 16 rows / 2 / 4
    ia3 = finetune(ip, "ia3", "method: ia3\ndata: {{ rows }}\nmetric: none\nsave: false\n")  # `r` is LoRA's
    assert ia3.status == "finished" and "r" not in ia3.config.options
    ip.run_line_magic("config", f"Finetune.defaults = {{'model': {run.config.model!r}, 'batch_sise': 2}}")
    failing(ip, "typo", "data: {{ rows }}\nmetric: none\nsave: false\n")
    assert "(`batch_sise` is set in %config Finetune.defaults)" in capsys.readouterr().err


def test_nbtune_run_set_may_replace_the_files_steps_with_epochs(tmp_path):
    from nbtune.cli import parse_overrides

    (tmp_path / "c.yaml").write_text("steps: 100\nr: 4\n")
    config = nbtune.RunConfig.parse(tmp_path / "c.yaml", **parse_overrides(["epochs=1"]))
    assert config.steps is None and config.epochs == 1


def test_dry_run_checks_everything_and_trains_nothing(ip, capsys):
    config = finetune(ip, "dry --dry-run")
    assert isinstance(config, nbtune.RunConfig) and "dry" not in runs()
    assert "16 training examples" in capsys.readouterr().out


def test_a_crash_mid_run_marks_it_failed_and_keeps_its_history(ip, capsys, monkeypatch):
    from nbtune.engine.training.callbacks import RunCallback

    original = RunCallback.on_step_end

    def crash_at_two(self, args, state, control, **kw):
        original(self, args, state, control, **kw)
        if state.global_step == 2:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(RunCallback, "on_step_end", crash_at_two)
    error = failing(ip, "crash")
    run = runs()["crash"]
    assert run.status == "failed" and "simulated crash" in run.error and len(run.history) == 2
    shown = capsys.readouterr().err.strip().splitlines()[-1]  # under the progress bar
    assert "run 'crash' failed: RuntimeError: simulated crash" in shown and "Traceback" not in shown
    # %tb prints, and %debug opens, the crash itself: not the one-line error that names it
    assert isinstance(error, nbtune.NbtuneError) and isinstance(error.__cause__, RuntimeError)
    assert sys.last_value is error.__cause__
    ip.run_line_magic("tb", "")
    assert "crash_at_two" in capsys.readouterr().out


def test_a_background_run_returns_at_once_and_stops_within_a_step(ip):
    cell = CELL.replace("steps: 3", "steps: 500")
    run = ip.run_cell_magic("finetune", "bg --no-panel --background", cell)
    assert run.status in ("pending", "running")
    started, deadline = threading.Event(), time.monotonic() + 60
    while not run.history and time.monotonic() < deadline:
        started.wait(0.05)
    assert run.history, f"no step within 60 s: {run.status} {run.error}"
    stopper = threading.Thread(target=run.stop)  # as the Stop button does, from another thread
    stopper.start()
    stopper.join()
    seen = len(run.history)
    run.wait(60)
    assert run.status == "stopped" and len(run.history) <= seen + 1 and run.model is not None


def test_a_new_cell_is_refused_while_a_background_run_trains(ip, capsys):
    run = ip.run_cell_magic("finetune", "long --no-panel --background", CELL.replace("steps: 3", "steps: 500"))
    failing(ip, "other")
    assert "still training" in capsys.readouterr().err
    run.stop()
    run.wait(60)
    assert finetune(ip, "other").status == "finished"


def test_import_nbtune_alone_does_not_import_ipython():
    import subprocess

    out = subprocess.run([sys.executable, "-c", "import nbtune, sys; print('IPython' in sys.modules)"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_shared_view_copies_modules_not_tensors(llama_base):
    model, _ = llama_base
    view = shared_view(model)
    assert view is not model and view.model.layers[0] is not model.model.layers[0]
    assert all(a is b for a, b in zip(view.parameters(), model.parameters(), strict=True))


def test_the_module_level_workbench_is_what_nbtune_runs_shows():
    import nbtune.engine.workbench as wb

    assert nbtune.runs is wb.WORKBENCH.runs


def test_resume_flag_continues_a_stopped_run(ip, capsys):
    run = ip.run_cell_magic("finetune", "later --no-panel --background", CELL.replace("steps: 3", "steps: 6"))
    run.stop()
    run.wait(60)
    assert run.status == "stopped"
    stopped_at = len(run.history)
    assert stopped_at < 6
    resumed = ip.run_line_magic("finetune", "later --no-panel --resume")
    assert resumed is run and run.status == "finished" and len(run.history) == 6
    failing(ip, "nothing --resume", magic="%finetune")
    assert "no run 'nothing'" in capsys.readouterr().err


def test_merging_a_run_leaves_the_shared_base_and_other_runs_alone(ip):
    a, b = finetune(ip, "a"), finetune(ip, "b")
    base = next(iter(runs_bases(ip).values())).model
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    b_logits = _logits(b)
    merged = a.merge()
    assert not hasattr(merged, "peft_config")
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())
    assert torch.equal(_logits(b), b_logits) and hasattr(a.model, "peft_config")


def _logits(run):
    run.model.eval()
    return logits_of(run.model, run.tokenizer("hello there", return_tensors="pt"))


def test_a_rerun_that_fails_before_training_keeps_the_earlier_run(ip, capsys):
    good = finetune(ip, "keep")
    failing(ip, "keep", CELL.replace("r: 4", "target_modules: [nope_proj]"))
    assert runs()["keep"] is good and good.model is not None
    assert "nope_proj" in capsys.readouterr().err
    failing(ip, "keep --model ./no/such/folder")
    assert runs()["keep"] is good


def test_a_runs_tokenizer_has_its_own_settings_and_shares_the_vocabulary(chat_tokenizer):
    from nbtune.engine.workbench import tokenizer_view

    view = tokenizer_view(chat_tokenizer)
    view.pad_token, view.padding_side, view.chat_template = "<|endoftext|>", "left", "{{ messages }}"
    assert chat_tokenizer.pad_token == "<|im_end|>" and chat_tokenizer.padding_side == "right"
    assert chat_tokenizer.chat_template != view.chat_template
    assert view.backend_tokenizer is chat_tokenizer.backend_tokenizer  # not rebuilt for every run
    assert view("Hello world")["input_ids"] == chat_tokenizer("Hello world")["input_ids"]


def test_a_background_cells_run_line_updates_when_the_run_ends(ip, monkeypatch):
    published = []
    monkeypatch.setattr(ip.display_pub, "publish",
                        lambda data, metadata=None, transient=None, update=False, **kw:
                        published.append((data.get("text/plain", ""), (transient or {}).get("display_id"), update)))
    result = ip.run_cell("%%finetune bg --background --no-panel\n" + CELL.replace("steps: 3", "steps: 4"))
    runs()["bg"].wait(60)
    assert result.success and runs()["bg"].status == "finished"
    first, last = published[0], published[-1]
    assert "<Run 'bg'" in first[0] and "finished" not in first[0] and not first[2]  # shown as the cell returned
    assert last[2] and last[1] == first[1] and "finished" in last[0]  # the same line, updated in place
    assert not any(type(o).__name__ == "_Refresh" for o in runs()["bg"].observers)  # detached


def test_a_finished_run_is_shown_once_and_not_watched(ip, monkeypatch):
    published = []
    monkeypatch.setattr(ip.display_pub, "publish", lambda data, **kw: published.append(data.get("text/plain", "")))
    ip.run_cell("%%finetune fg --no-panel\n" + CELL)
    assert len([p for p in published if "<Run 'fg'" in p]) == 1 and "finished" in published[-1]
    assert len(runs()["fg"].observers) == 1  # just the cell's own progress observer


def test_reclaim_all_refused_for_a_training_run_frees_nothing(ip):
    first = finetune(ip, "first")
    run = ip.run_cell_magic("finetune", "long --no-panel --background", CELL.replace("steps: 3", "steps: 500"))
    try:
        with pytest.raises(nbtune.NbtuneError, match="'long' is still training"):
            nbtune.reclaim("all")
        assert first.model is not None and isinstance(first.generate("hi", max_new_tokens=2), str)
    finally:
        run.stop()
        run.wait(60)


def test_compare_of_every_run_answers_with_the_runs_that_hold_a_model(ip, monkeypatch):
    from nbtune.engine.training.callbacks import RunCallback

    good = finetune(ip, "good")
    original = RunCallback.on_step_end

    def crash_after_one(self, args, state, control, **kw):
        original(self, args, state, control, **kw)
        raise RuntimeError("crash after a step")

    with monkeypatch.context() as patch:
        patch.setattr(RunCallback, "on_step_end", crash_after_one)
        failing(ip, "broken")
    assert nbtune.runs["broken"].status == "failed"
    nbtune.reclaim("broken")  # a failed run without its model
    rows = nbtune.compare().generations(["hi"], max_new_tokens=2)
    assert set(rows[0]) == {"prompt", "base", good.name}
    assert [r["run"] for r in nbtune.compare().table()] == ["good", "broken"]
    with pytest.raises(nbtune.NbtuneError, match="has no model"):  # named explicitly: say why it cannot answer
        nbtune.compare("good", "broken").generations(["hi"])


def test_nbtune_errors_from_python_calls_show_one_line(ip, capsys):
    result = ip.run_cell("import nbtune\nnbtune.compare('nosuch')")
    assert isinstance(result.error_in_exec, nbtune.NbtuneError)  # still an error: "Run all" stops here
    shown = capsys.readouterr()
    assert "nbtune: no run 'nosuch' in nbtune.runs" in shown.err
    assert "Traceback" not in shown.out + shown.err
    result = ip.run_cell("1 / 0")  # other errors keep IPython's traceback
    assert "ZeroDivisionError" in capsys.readouterr().out


def test_resume_through_the_magic_says_why_a_method_cannot(ip, capsys):
    cell = "method: prefix\nnum_virtual_tokens: 4\ndata: {{ rows }}\nsteps: 500\nbatch_size: 4\nmetric: none\n" \
           "save: false\n"
    run = ip.run_cell_magic("finetune", "pre --no-panel --background", cell)
    deadline = time.monotonic() + 60
    while not run.history and time.monotonic() < deadline:
        time.sleep(0.05)
    run.stop()
    run.wait(60)
    assert run.status == "stopped"
    capsys.readouterr()
    failing(ip, "pre --resume", magic="%finetune")
    assert "method 'prefix' cannot resume" in capsys.readouterr().err


def test_a_notebook_variable_on_the_magics_line(ip, demo_rows):
    import pandas as pd

    ip.user_ns["frame"] = pd.DataFrame(demo_rows[:8])
    body = "r: 4\nsteps: 1\nbatch_size: 2\nmetric: none\nsave: false\n"
    for name, line in (("spaced", "{{ frame }}"), ("tight", "{{frame}}")):
        result = ip.run_cell(f"%%finetune {name} --no-panel --data {line}\n{body}")
        assert result.error_in_exec is None and result.result.status == "finished", name
        assert result.result.config.data is ip.user_ns["frame"]
    assert not ip.run_cell(f"%%finetune missing --no-panel --data {{{{ nowhere }}}}\n{body}").success
    assert "missing" not in runs()
