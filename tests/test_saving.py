"""Saved artefacts are standard: plain peft / transformers load them and reproduce the trained model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import logits_of, tiny_llama

import nbtune

FAST = {"steps": 4, "batch_size": 4, "lr": 1e-2, "metric": "none"}


def _logits(model, tokenizer, text="Convert this date to ISO format (YYYY-MM-DD): 2 June 1999"):
    model.eval()
    return logits_of(model, tokenizer(text, return_tensors="pt"))  # on the device runs train on


def test_lora_adapter_loads_in_plain_peft_and_gives_identical_logits(chat_tokenizer, demo_rows, tmp_path):
    from peft import PeftModel

    run = nbtune.finetune(data=demo_rows, base=(tiny_llama(chat_tokenizer), chat_tokenizer), output_dir="out",
                          **FAST)
    path = run.save(tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "run.json"} <= {p.name for p in path.iterdir()}
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pkl"))  # no pickles
    loaded = PeftModel.from_pretrained(tiny_llama(chat_tokenizer), path)
    assert torch.equal(_logits(loaded, chat_tokenizer), _logits(run.model, chat_tokenizer))
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"


def test_run_json_holds_config_metrics_and_history(llama_base, demo_rows):
    run = nbtune.finetune(data=demo_rows, base=llama_base, output_dir="out", name="keep", r=4, **FAST)
    saved = json.loads((run.saved_to / "run.json").read_text())
    assert saved["name"] == "keep" and saved["method"] == "lora" and saved["status"] == "finished"
    assert saved["config"]["r"] == 4 and saved["config"]["data"] == "<list>"
    assert len(saved["history"]) == 4 and saved["metrics"]["trainable_params"] == run.metrics["trainable_params"]


def test_save_replaces_an_existing_folder_atomically(llama_base, demo_rows, tmp_path):
    target = tmp_path / "twice"
    target.mkdir()
    (target / "run.json").write_text("{}")  # an earlier save
    (target / "stale.txt").write_text("old")
    run = nbtune.finetune(data=demo_rows, base=llama_base, save=False, **FAST)
    run.save(target)
    assert not (target / "stale.txt").exists() and (target / "adapter_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".twice")]  # no temp folders left


def test_a_failing_save_leaves_the_previous_folder_intact(llama_base, demo_rows, tmp_path, monkeypatch):
    run = nbtune.finetune(data=demo_rows, base=llama_base, save=False, **FAST)
    target = run.save(tmp_path / "keep")
    before = (target / "adapter_model.safetensors").read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(run.tokenizer, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        run.save(target)
    assert (target / "adapter_model.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".keep")]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_adapters_are_converted_to_apply_to_the_original_base(chat_tokenizer, demo_rows, init,
                                                                              tmp_path):
    from peft import PeftModel

    run = nbtune.finetune(data=demo_rows, base=(tiny_llama(chat_tokenizer), chat_tokenizer), init=init,
                          output_dir="out", **FAST)
    path = run.save(tmp_path / init)
    loaded = PeftModel.from_pretrained(tiny_llama(chat_tokenizer), path)  # the untouched original base
    assert json.loads((path / "adapter_config.json").read_text())["r"] == 16  # PiSSA -> LoRA doubles the rank
    torch.testing.assert_close(_logits(loaded, chat_tokenizer), _logits(run.model, chat_tokenizer),
                               atol=1e-4, rtol=1e-4)


def test_rslora_is_recorded_in_the_adapter_config(llama_base, demo_rows):
    run = nbtune.finetune(data=demo_rows, base=llama_base, rslora=True, output_dir="out", **FAST)
    assert json.loads((run.saved_to / "adapter_config.json").read_text())["use_rslora"] is True


def test_full_fine_tuning_changes_every_weight_and_saves_a_loadable_model(chat_tokenizer, demo_rows):
    from transformers import AutoModelForCausalLM

    before = {n: p.detach().clone() for n, p in tiny_llama(chat_tokenizer).named_parameters()}
    run = nbtune.finetune(data=demo_rows, base=(tiny_llama(chat_tokenizer), chat_tokenizer), method="full",
                          output_dir="full", **{**FAST, "lr": 1e-3})
    assert run.metrics["trainable_percent"] == 100.0
    changed = [n for n, p in run.model.named_parameters() if not torch.equal(p.cpu(), before[n].cpu())]
    assert len(changed) == len(before)
    assert (run.saved_to / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(run.saved_to)
    assert torch.equal(_logits(reloaded, chat_tokenizer), _logits(run.model, chat_tokenizer))


def test_freeze_trains_only_the_top_layers_and_named_modules(chat_tokenizer, demo_rows):
    before = {n: p.detach().clone() for n, p in tiny_llama(chat_tokenizer).named_parameters()}
    run = nbtune.finetune(data=demo_rows, base=(tiny_llama(chat_tokenizer), chat_tokenizer), method="freeze",
                          trainable_layers=1, trainable_modules=["model.norm"], output_dir="frozen",
                          **{**FAST, "lr": 1e-3})
    changed = {n for n, p in run.model.named_parameters() if not torch.equal(p.cpu(), before[n].cpu())}
    assert changed and all(n.startswith("model.layers.1.") or n == "model.norm.weight" for n in changed)
    assert "model.norm.weight" in changed
    assert not any(n.startswith("model.layers.0.") for n in changed)
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    assert run.metrics["trainable_params"] == trainable
    assert (run.saved_to / "model.safetensors").is_file()


def test_freeze_with_a_pattern_that_matches_nothing_names_real_parameters(llama_base, demo_rows):
    with pytest.raises(nbtune.MethodError, match=r"model\.embed_tokens"):
        nbtune.finetune(data=demo_rows, base=llama_base, method="freeze", trainable_layers=0,
                        trainable_modules=["nonexistent"], **FAST)


def test_base_scoring_is_refused_for_methods_that_change_base_weights(llama_base, demo_rows):
    run = nbtune.finetune(data=demo_rows, eval_data=demo_rows[:4], base=llama_base, method="full", save=False,
                          **FAST)
    with pytest.raises(nbtune.NbtuneError, match="trained the base weights in place"):
        run.evaluate(use_adapter=False)


def test_save_never_replaces_a_folder_it_did_not_write(llama_base, demo_rows, tmp_path):
    mine = tmp_path / "mydata"
    mine.mkdir()
    (mine / "train.jsonl").write_text("{}\n")
    run = nbtune.finetune(data=demo_rows, base=llama_base, save=False, **FAST)
    with pytest.raises(nbtune.NbtuneError, match="did not write"):
        run.save(mine)
    assert [p.name for p in mine.iterdir()] == ["train.jsonl"] and (mine / "train.jsonl").read_text() == "{}\n"
    with pytest.raises(nbtune.NbtuneError, match="names no folder"):
        run.save(".")


def test_a_failed_final_save_keeps_the_trained_run(llama_base, demo_rows, tmp_path):
    class TakesTheFolder:  # a file where the run saves, arriving while it trains (checked before, it was free)
        def on_step(self, run, record):
            (tmp_path / "taken").write_text("a file, not a folder")

    with pytest.warns(UserWarning, match="run.save"):
        run = nbtune.finetune(data=demo_rows, base=llama_base, output_dir=str(tmp_path / "taken"),
                              observers=[TakesTheFolder()], **FAST)
    assert run.status == "finished" and "saving" in run.error and run.model is not None
    assert run.save(tmp_path / "elsewhere").is_dir()


def test_pissa_runs_refuse_to_pose_as_the_base(llama_base, demo_rows):
    run = nbtune.finetune(data=demo_rows, eval_data=demo_rows[:4], base=llama_base, init="pissa", save=False,
                          **FAST)
    with pytest.raises(nbtune.MethodError, match="moved part of the base weights"):
        run.evaluate(use_adapter=False)
