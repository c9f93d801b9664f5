"""The method picker by its widget state: fields follow the method, errors show inline, and the cell
it writes reproduces its config."""

from __future__ import annotations

import pytest

import nbtune
from nbtune.magics.parse import parse_cell

pytest.importorskip("ipywidgets")


@pytest.fixture
def picker(tiny_model_dir):
    return nbtune.picker(model=str(tiny_model_dir))


def test_choosing_a_method_shows_its_own_options(picker):
    assert list(picker.options) == list(nbtune.methods("lora").option_names())
    picker.method.value = "prefix"
    assert list(picker.options) == list(nbtune.methods("prefix").option_names())
    labels = [getattr(w, "description", "") or w.children[0].value for w in picker.options_box.children]
    assert labels == list(nbtune.methods("prefix").option_names())
    picker.method.value = "ia3"
    assert [w.children[0].value for w in picker.options_box.children] == ["target_modules", "feedforward_modules"]


def test_the_learning_rate_follows_the_method_until_it_is_edited(picker):
    picker.method.value = "ia3"
    assert picker.common["lr"].value == nbtune.methods("ia3").default_lr
    picker.common["lr"].value = 0.01
    picker.method.value = "lora"
    assert picker.common["lr"].value == 0.01


def test_derived_fields_follow_the_method_and_edited_ones_stay_edited(picker):
    def shown_and_trained(key):
        return picker.common[key].value, getattr(picker.config(), key)

    picker.method.value = "full"  # lr derived from lora before: now full's, in the field and in the config
    assert shown_and_trained("lr") == (nbtune.methods("full").default_lr,) * 2
    assert "lr" in picker.config().derived and "lr:" not in picker.cell.value
    picker.common["lr"].value = 3e-5
    picker.method.value = "lora"
    assert shown_and_trained("lr") == (3e-5, 3e-5) and "lr: 3.0e-05" in picker.cell.value
    picker.method.value = "qlora"
    assert shown_and_trained("quantization") == ("4bit", "4bit") and "quantization" not in picker.cell.value
    picker.common["quantization"].value = "8bit"
    picker.method.value = "lora"
    assert shown_and_trained("quantization") == ("8bit", "8bit") and "quantization: 8bit" in picker.cell.value


def test_a_method_changed_while_the_form_is_invalid_still_brings_its_lr(picker):
    picker.common["batch_size"].value = 0
    picker.method.value = "full"
    assert picker.train.disabled  # no config, so nothing derived yet
    picker.common["batch_size"].value = 4
    assert picker.common["lr"].value == picker.config().lr == nbtune.methods("full").default_lr


def test_module_pickers_list_the_models_linear_modules(picker):
    allowed = picker.options["target_modules"].allowed_tags
    assert {"q_proj", "v_proj", "down_proj", "all-linear"} <= set(allowed)


def test_an_invalid_value_is_explained_inline_and_blocks_training(picker):
    picker.options["r"].value = 0
    assert "`r`" in picker.message.value and picker.train.disabled and picker.cell.value == ""
    picker.options["r"].value = 16
    assert picker.message.value == "" and not picker.train.disabled


def test_the_estimates_follow_the_form(picker):
    picker.options["r"].value = 8
    small = picker.estimates.value
    picker.options["r"].value = 16
    assert "trainable parameters" in picker.estimates.value and picker.estimates.value != small


@pytest.mark.parametrize("method", ["lora", "ia3", "prefix", "houlsby", "freeze"])
def test_the_inserted_cell_reproduces_the_config(picker, method):
    picker.method.value = method
    picker.common["steps"].value = 7
    assert picker.cell.value.partition("\n")[0] == "%%finetune"  # no name yet: the run names itself
    picker.common["name"].value = "mine"
    first, _, body = picker.cell.value.partition("\n")
    assert first == "%%finetune mine"
    from_cell = nbtune.RunConfig.parse({**parse_cell(body, {}), "name": "mine"})
    assert from_cell.to_dict() == picker.config().to_dict()


def test_a_picker_reopened_from_a_run_is_prefilled(tiny_model_dir, demo_rows, monkeypatch):
    from nbtune.engine.workbench import Workbench

    bench = Workbench()
    monkeypatch.setattr("nbtune.engine.workbench.WORKBENCH", bench)
    bench.finetune({"name": "seen", "model": str(tiny_model_dir), "data": "demo", "method": "ia3", "steps": 2,
                    "batch_size": 4, "metric": "none", "save": False})
    reopened = nbtune.picker("seen")
    assert reopened.method.value == "ia3" and reopened.common["steps"].value == 2
    assert reopened.config().to_dict() == {**bench.runs["seen"].config.to_dict()}
    reopened.method.value = "lora"  # the run's lr was ia3's default, not chosen: it follows the method
    assert reopened.common["lr"].value == reopened.config().lr == nbtune.methods("lora").default_lr


def test_the_picker_starts_from_the_notebooks_default_model(tiny_model_dir, demo_rows):
    from conftest import nbtune_shell

    with nbtune_shell(tiny_model_dir, rows=demo_rows) as shell:  # sets %config Finetune.defaults = {'model': ...}
        form = shell.run_cell("import nbtune\nnbtune.picker()").result
        assert form.model == str(tiny_model_dir)
        assert f"model: {tiny_model_dir}" in form.cell_text()  # the inserted cell trains what Train trains


def test_a_reopened_run_keeps_its_lr_and_an_epochs_run_can_train_again(tiny_model_dir, monkeypatch):
    from nbtune.engine.workbench import Workbench

    bench = Workbench()
    monkeypatch.setattr("nbtune.engine.workbench.WORKBENCH", bench)
    common = {"model": str(tiny_model_dir), "data": "demo", "batch_size": 4, "metric": "none", "save": False}
    bench.finetune({**common, "name": "fast", "lr": 1e-3, "steps": 1})
    bench.finetune({**common, "name": "by-epochs", "epochs": 0.01})
    fast = nbtune.picker("fast")
    assert fast.config().lr == 1e-3
    fast.method.value = "full"  # an lr the run was given is the user's: it stays
    assert fast.common["lr"].value == fast.config().lr == 1e-3
    reopened = nbtune.picker("by-epochs")
    assert not reopened.train.disabled and reopened.message.value == ""
    assert reopened.config().epochs == 0.01 and reopened.config().steps is None


def test_a_run_that_trained_one_derived_epoch_reopens_ready_to_train(tiny_model_dir):
    from types import SimpleNamespace

    from nbtune.methods import get_method
    from nbtune.widgets.picker import Picker

    config = nbtune.RunConfig.parse({"name": "whole", "model": str(tiny_model_dir), "r": 4})  # epochs: 1, derived
    reopened = Picker(SimpleNamespace(config=config, method=get_method("lora")))
    assert reopened.message.value == "" and not reopened.train.disabled
    assert reopened.config().to_dict() == config.to_dict()


def test_the_cell_of_a_form_with_rows_in_memory_and_edits_runs_as_the_same_config(tiny_model_dir, demo_rows):
    from conftest import nbtune_shell

    from nbtune.config import load_yaml

    with nbtune_shell(tiny_model_dir) as shell:
        form = shell.run_cell("import nbtune\nnbtune.picker()").result
        form._hold(demo_rows[:4])
        form.common["data"].value = form._held[0]  # as a reopened run with a list of dicts shows it
        form.method.value = "prefix"
        form.options["num_virtual_tokens"].value = 4
        form.common["lr"].value = 0.02
        form.common["name"].value = "celled"
        text = form.cell_text()
        assert load_yaml(text.partition("\n")[2])["data"] == demo_rows[:4]  # the rows, written out
        ran = shell.run_cell(text.replace("%%finetune celled", "%%finetune celled --dry-run", 1))
        assert ran.success and ran.result.to_dict() == form.config().to_dict()
        assert ran.result.derived == form.config().derived  # precision, dtype: derived in both


def test_qlora_in_the_picker_brings_its_4bit_base_and_half_typed_yaml_is_explained(picker):
    picker.method.value = "qlora"
    assert picker.common["quantization"].value == "4bit" and picker.message.value == ""
    picker.method.value = "lora"
    assert picker.common["quantization"].value == "none"
    picker.method.value = "peft"
    picker.options["peft_args"].value = "{r: ["
    assert "`peft_args` is not valid YAML yet" in picker.message.value and picker.train.disabled


def test_a_method_the_model_cannot_take_blocks_train_with_the_reason(picker):
    picker.method.value = "bitfit"  # the tiny Llama has no bias terms
    assert "bias" in picker.message.value and picker.train.disabled
    picker.method.value = "lora"
    assert picker.message.value == "" and not picker.train.disabled
