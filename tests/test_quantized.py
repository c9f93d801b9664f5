"""QLoRA on CPU: bitsandbytes 4-bit NF4 (double quant) and 8-bit bases under a trainable LoRA."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import nbtune

pytest.importorskip("bitsandbytes", reason="bitsandbytes is part of nbtune[quant]; make test installs it")

FAST = {"steps": 3, "batch_size": 4, "lr": 1e-2, "metric": "none"}


def _base_layer(run):
    return run.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer


def test_qlora_defaults_to_4bit_nf4_with_double_quant(tiny_model_dir, demo_rows):
    run = nbtune.finetune(model=str(tiny_model_dir), method="qlora", data=demo_rows, output_dir="q4", **FAST)
    layer = _base_layer(run)
    assert type(layer).__name__ == "Linear4bit"
    assert layer.weight.quant_type == "nf4"
    assert layer.weight.quant_state.nested  # double quantisation: the scales are quantized too
    losses = [r["loss"] for r in run.history]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert (run.saved_to / "adapter_model.safetensors").is_file()
    assert json.loads((run.saved_to / "run.json").read_text())["config"]["quantization"] == "4bit"
    # the frozen 4-bit weights count at their real size, not the packed byte count
    base_params = sum(p.numel() for p in _unquantized(tiny_model_dir))
    assert run.metrics["total_params"] == base_params + run.metrics["trainable_params"]


def test_qlora_in_8bit(tiny_model_dir, demo_rows):
    run = nbtune.finetune(model=str(tiny_model_dir), method="qlora", quantization="8bit", data=demo_rows,
                          output_dir="q8", **FAST)
    assert type(_base_layer(run)).__name__ == "Linear8bitLt"
    assert run.status == "finished" and len(run.history) == 3


def test_lora_on_a_4bit_base_is_qlora_too(tiny_model_dir, demo_rows):
    run = nbtune.finetune(model=str(tiny_model_dir), method="lora", quantization="4bit", data=demo_rows,
                          output_dir="l4", **FAST)
    assert type(_base_layer(run)).__name__ == "Linear4bit"
    assert isinstance(run.generate("hi", max_new_tokens=2), str)


def test_4bit_without_bitsandbytes_says_how_to_fix_it(tiny_model_dir, demo_rows, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(nbtune.DependencyError, match="pip install bitsandbytes") as info:
        nbtune.finetune(model=str(tiny_model_dir), method="qlora", data=demo_rows, **FAST)
    assert info.value.field == "quantization"


def _unquantized(path):
    from transformers import AutoModelForCausalLM

    return list(AutoModelForCausalLM.from_pretrained(path).parameters())
