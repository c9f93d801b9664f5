"""GGUF export (`run.export(path, format="gguf", quant=...)`) on tiny in-memory models: the file reads back
with transformers' GGUF reader and computes what the merged model computes; bad input is refused before
anything is written, and nothing half-written is left behind."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import logits_of

import nbtune
from nbtune.errors import NbtuneError

ROWS = [{"prompt": f"Convert {i} March 1999", "completion": f"1999-03-{i:02d}"} for i in range(1, 17)]


def _train(base, **settings):
    options = {"steps": 3, "lr": 1e-2, "batch_size": 4, "metric": "none", "save": False, **settings}
    return nbtune.finetune(data=ROWS, base=base, **options)


@pytest.fixture
def lora_run(llama_base):
    return _train(llama_base, name="dates")


def _reader(path):
    import gguf

    return gguf.GGUFReader(str(path))


@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0"])
def test_a_lora_run_exports_one_gguf_file_that_loads_back_and_matches(lora_run, tmp_path, quant):
    from nbtune.engine.export.gguf_check import TOLERANCE, load_gguf
    from nbtune.engine.export.merging import merged_for_export

    out = lora_run.export(tmp_path / "out", format="gguf", quant=quant)
    assert out.path == tmp_path / "out" / f"dates-{quant}.gguf" and out.path.is_file()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["Modelfile", f"dates-{quant}.gguf",
                                                                     "gguf_export.json"]
    assert out.check.ok and out.check.same_tokens and len(out.check.answers) == 3
    assert out.check.relative_diff <= TOLERANCE[quant]
    assert f"tolerance {TOLERANCE[quant]}" in repr(out) and "Ollama: ollama create" in repr(out)
    report = json.loads((tmp_path / "out" / "gguf_export.json").read_text())
    assert report["quant"] == quant and report["check"]["ok"] and report["size_bytes"] == out.size_bytes

    # checked here independently of the export's own check: the merged model vs the file read back
    merged = merged_for_export(lora_run).float()
    reloaded, tokenizer = load_gguf(out.path)
    ids = lora_run.tokenizer(["Convert 7 March 1999"], return_tensors="pt")
    ours, theirs = logits_of(merged, dict(ids)), logits_of(reloaded, dict(ids))
    assert (ours - theirs).abs().max() <= TOLERANCE[quant] * ours.std()
    assert tokenizer("<|im_start|>user\nhi<|im_end|>")["input_ids"] == \
        lora_run.tokenizer("<|im_start|>user\nhi<|im_end|>")["input_ids"]


def test_the_file_carries_the_architecture_tokenizer_and_chat_template(lora_run, tmp_path):
    out = lora_run.export(tmp_path / "q8", format="gguf", quant="q8_0")
    reader = _reader(out.path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    config, tokenizer = lora_run.model.get_base_model().config, lora_run.tokenizer
    assert fields["general.architecture"] == "llama" and fields["general.finetune"] == "dates"
    assert fields["general.name"].startswith("dates (fine-tune of ")
    assert fields["llama.block_count"] == config.num_hidden_layers
    assert fields["llama.embedding_length"] == config.hidden_size
    assert fields["llama.attention.head_count_kv"] == config.num_key_value_heads
    assert fields["llama.context_length"] == config.max_position_embeddings
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"]) == config.vocab_size
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert fields["tokenizer.ggml.merges"]
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert fields["tokenizer.ggml.token_type"][im_start] == 3  # CONTROL: kept whole by readers
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q8_0" and kinds["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in kinds  # tied embeddings: llama.cpp reuses token_embd
    assert not any("lora" in name for name in kinds)


def test_exporting_changes_neither_the_run_nor_the_base_it_shares(lora_run, tmp_path):
    before = {k: v.clone() for k, v in lora_run.model.state_dict().items()}  # the base's weights and the adapter
    assert any("base_layer" in k for k in before) and any("lora_A" in k for k in before)
    ids = {"input_ids": torch.tensor([[5, 6, 7, 8]])}
    logits = logits_of(lora_run.model, ids)
    lora_run.export(tmp_path / "a", format="gguf", quant="q8_0")
    lora_run.export(tmp_path / "b")  # safetensors: the same merge path
    after = lora_run.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(logits, logits_of(lora_run.model, ids))
    assert hasattr(lora_run.model, "peft_config")  # still the run's adapter, not merged away


def test_a_full_fine_tune_exports_its_own_weights(llama_base, tmp_path):
    run = _train(llama_base, name="whole", method="full")
    out = run.export(tmp_path / "full", format="gguf", quant="f16")
    assert out.check.ok


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_qwen2_and_mistral_models_round_trip(chat_tokenizer, tmp_path, family):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = {"vocab_size": len(chat_tokenizer), "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 256, "eos_token_id": chat_tokenizer.eos_token_id,
             "tie_word_embeddings": family == "qwen2"}
    model = (Qwen2ForCausalLM(Qwen2Config(**shape)) if family == "qwen2"
             else MistralForCausalLM(MistralConfig(**shape, sliding_window=None)))
    run = _train((model, chat_tokenizer), name=family)
    out = run.export(tmp_path / family, format="gguf", quant="f16")
    assert out.check.ok
    fields = {name: field.contents() for name, field in _reader(out.path).fields.items()}
    assert fields["general.architecture"] == ("qwen2" if family == "qwen2" else "llama")
    tensors = {t.name for t in _reader(out.path).tensors}
    assert ("blk.0.attn_q.bias" in tensors) == (family == "qwen2")  # Qwen2's attention biases come along
    assert ("output.weight" in tensors) == (family == "mistral")  # an untied output layer is written


# ---------------------------------------------------------------- refused, nothing written
def _nothing_written(parent, name):
    return not (parent / name).exists() and not [p for p in parent.iterdir() if name in p.name]


def test_an_unsupported_architecture_is_refused_naming_the_supported_ones(gpt2_base, tmp_path):
    run = _train(gpt2_base, name="g")
    with pytest.raises(NbtuneError, match=r"'gpt2' architecture; supported: llama, mistral, qwen2"):
        run.export(tmp_path / "g", format="gguf")
    assert _nothing_written(tmp_path, "g")


@pytest.mark.parametrize(("quant", "message"), [("Q8_0", "Did you mean `q8_0`"),
                                                  ("q4_k_m", "Choose one of: f16, bf16, q8_0"),
                                                  ("", "unknown GGUF quantisation ''. Choose one of")])
def test_an_unknown_quantisation_is_refused(lora_run, tmp_path, quant, message):
    with pytest.raises(NbtuneError, match=message):
        lora_run.export(tmp_path / "q", format="gguf", quant=quant)
    assert _nothing_written(tmp_path, "q")


def test_unknown_formats_and_a_quant_for_safetensors_are_refused(lora_run, tmp_path):
    with pytest.raises(NbtuneError, match="unknown export format 'onnx'"):
        lora_run.export(tmp_path / "x", format="onnx")
    with pytest.raises(NbtuneError, match="`quant` is for format='gguf'"):
        lora_run.export(tmp_path / "x", quant="q8_0")


@pytest.mark.parametrize("method", ["houlsby", "prefix"])
def test_a_method_that_cannot_merge_is_refused_by_name(llama_base, tmp_path, method):
    run = _train(llama_base, name="nm", method=method)
    with pytest.raises(NbtuneError, match=rf"method '{method}' cannot be merged .* methods that export: .*lora"):
        run.export(tmp_path / "nm", format="gguf")
    assert _nothing_written(tmp_path, "nm")


def test_a_folder_of_other_files_is_refused_and_an_earlier_export_replaced(lora_run, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(NbtuneError, match="already holds files nbtune did not write"):
        lora_run.export(mine, format="gguf")
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    lora_run.export(tmp_path / "again", format="gguf", quant="f16")
    out = lora_run.export(tmp_path / "again", format="gguf", quant="q8_0")
    assert sorted(p.name for p in out.path.parent.iterdir()) == ["Modelfile", "dates-q8_0.gguf", "gguf_export.json"]


def test_the_runs_own_saved_folder_is_refused_as_a_saved_run(tmp_path, llama_base):
    run = _train(llama_base, name="saved", save=True, output_dir=str(tmp_path / "saved"))
    before = sorted(p.name for p in run.saved_to.iterdir())
    for fmt in ("gguf", "safetensors"):
        with pytest.raises(NbtuneError, match=r"exists and is a saved run; export the merged model to a new"):
            run.export(run.saved_to, format=fmt)
    assert sorted(p.name for p in run.saved_to.iterdir()) == before


def test_too_little_disk_space_is_refused_with_the_size_needed(lora_run, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(NbtuneError, match=r"not enough disk space .* needs about [\d.]+ MB and 0\.0 MB are free"):
        lora_run.export(tmp_path / "full-disk", format="gguf")
    assert _nothing_written(tmp_path, "full-disk")


def test_a_file_that_does_not_match_is_not_kept(lora_run, tmp_path, monkeypatch):
    from nbtune.engine.export import gguf_file

    monkeypatch.setattr(gguf_file, "_llama_rope_order", lambda weights, heads: weights)  # a layout bug
    with pytest.raises(NbtuneError, match=r"did not match the merged model, so nothing was written: f16: max"):
        lora_run.export(tmp_path / "bad", format="gguf", quant="f16")
    assert list(tmp_path.iterdir()) == [] or _nothing_written(tmp_path, "bad")


def test_a_sweep_trials_name_makes_a_plain_file_name(llama_base, tmp_path):
    run = _train(llama_base, name="dates/3")
    out = run.export(tmp_path / "t", format="gguf", quant="q8_0")
    assert out.path.name == "dates-3-q8_0.gguf"


def test_a_4bit_qlora_run_is_merged_into_its_base_reloaded_in_fp32(tiny_model_dir, demo_rows, tmp_path):
    run = nbtune.finetune(model=str(tiny_model_dir), method="qlora", data=demo_rows[:16], steps=2, batch_size=4,
                          lr=1e-2, metric="none", save=False, name="q4")
    out = run.export(tmp_path / "q4", format="gguf", quant="q8_0")
    assert out.check.ok, out
    assert getattr(run.model, "is_loaded_in_4bit", False) or run.context.quantized  # the run keeps its 4-bit base


def test_evaluate_scores_the_runs_metrics_with_the_model_read_back_from_the_file(llama_base, tmp_path, monkeypatch):
    from nbtune.engine.export import gguf_check

    run = _train(llama_base, name="scored", eval_split=0.25, metric="exact_match")
    out = run.export(tmp_path / "s", format="gguf", quant="f16")
    read = []
    loader = gguf_check.load_gguf
    monkeypatch.setattr(gguf_check, "load_gguf", lambda path: read.append(path) or loader(path))
    scores = out.evaluate()
    assert read == [out.path]  # the answers come from the file, not from the run's model
    assert scores["samples"] == len(run.eval_pairs) == 4 and 0.0 <= scores["exact_match"] <= 1.0


def test_evaluate_needs_eval_rows_with_answers(lora_run, tmp_path):
    out = lora_run.export(tmp_path / "u", format="gguf")
    with pytest.raises(NbtuneError, match="no eval data with answers"):
        out.evaluate()
