"""GGUF export on the real SmolLM2-135M-Instruct: the demo adapter's answers survive the round trip."""

from __future__ import annotations

import pytest
import torch

import nbtune

pytestmark = pytest.mark.integration


def test_the_demo_adapter_survives_export_to_q8_0_gguf(tmp_path):
    run = nbtune.finetune(name="dates", data="demo", steps=20, batch_size=4, lr=2e-3, metric="none", save=False)
    weights = {k: v.clone() for k, v in run.model.state_dict().items()}
    out = run.export(tmp_path / "gguf", format="gguf", quant="q8_0")

    assert out.check.ok and out.check.same_tokens, out
    assert 100e6 < out.size_bytes < 200e6  # 135M weights at 8.5 bits (f16 would be ~270 MB)
    modelfile = out.modelfile.read_text()
    assert "FROM ./dates-q8_0.gguf" in modelfile and "You are a helpful AI assistant named SmolLM" in modelfile

    # the check answered the run's first 3 held-out prompts with the merged model and with the file
    answers = [(a["answer"], a["gguf_answer"]) for a in out.check.answers]
    references = [answer for _, answer in run.eval_pairs[:3]]
    assert all(ours == theirs for ours, theirs in answers), answers
    assert sum(ours == ref for (ours, _), ref in zip(answers, references, strict=True)) >= 2, (answers, references)

    after = run.model.state_dict()  # the run and the cached base it shares are untouched
    assert all(torch.equal(weights[k], after[k]) for k in weights)
