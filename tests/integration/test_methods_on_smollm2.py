"""One real-model check per method family: a few steps on SmolLM2-135M-Instruct, loss finite and falling."""

from __future__ import annotations

import pytest
import torch

import nbtune
from nbtune.engine.bases.loading import load_base, resolve_model

pytestmark = pytest.mark.integration

FAMILIES = [  # (method, options, lr): the lr each family needs to move in a handful of steps
    ("dora", {}, 1e-3),
    ("loraplus", {}, 5e-4),
    # AdaLoRA starts from E = 0 and moves slowly: at 1e-3 four steps change the loss by 0.006, below bf16 noise
    ("adalora", {"init_r": 8, "target_r": 4}, 5e-3),
    ("houlsby", {}, 1e-3),
    ("pfeiffer", {}, 1e-3),
    ("prefix", {"num_virtual_tokens": 8}, 1e-3),
    ("ptuning_v2", {"num_virtual_tokens": 8}, 5e-3),
    ("prompt", {"init": "text", "init_text": "Answer with the ISO date only."}, 3e-2),
    ("ptuning", {"num_virtual_tokens": 8}, 1e-3),
    ("ia3", {}, 1e-2),
    ("ln_tuning", {}, 1e-3),
    ("peft", {"peft_type": "vera", "peft_args": {"r": 64, "target_modules": ["q_proj", "v_proj"]}}, 1e-2),
    ("freeze", {"trainable_layers": 2}, 1e-4),
    ("full", {}, 2e-5),
]


@pytest.fixture(scope="module")
def smollm2():
    return resolve_model(nbtune.DEFAULT_MODEL)


@pytest.fixture(scope="module")
def rows():
    from nbtune.data.demo import demo_splits

    return demo_splits()[0][:4]  # one batch, every step: the loss on it must fall


@pytest.mark.parametrize(("method", "options", "lr"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_each_family_trains_smollm2(smollm2, rows, method, options, lr):
    run = nbtune.finetune(data=rows, method=method, steps=4, batch_size=4, lr=lr, lr_scheduler="constant",
                          metric="none", save=False, **options)
    losses = [r["loss"] for r in run.history]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses


def test_qlora_trains_smollm2_in_4bit(smollm2, rows):
    pytest.importorskip("bitsandbytes")
    run = nbtune.finetune(data=rows[:2], method="qlora", steps=3, batch_size=2, lr=1e-3, lr_scheduler="constant",
                          metric="none", save=False)
    losses = [r["loss"] for r in run.history]
    assert losses[-1] < losses[0], losses


def test_bitfit_on_smollm2_says_it_has_no_biases(smollm2, rows):
    with pytest.raises(nbtune.MethodError, match="ia3"):
        nbtune.finetune(data=rows, method="bitfit", steps=1, metric="none", save=False)


def test_a_saved_bottleneck_adapter_reloads_on_smollm2(smollm2, rows, tmp_path):
    run = nbtune.finetune(data=rows, method="houlsby", steps=2, batch_size=4, lr=1e-3, metric="none",
                          output_dir=str(tmp_path / "houlsby"))
    loaded = nbtune.load(run.saved_to, base=load_base(str(smollm2), dtype=run.config.dtype))
    ids = run.tokenizer("Convert this date to ISO format (YYYY-MM-DD): 1 May 2000", return_tensors="pt")
    run.model.eval()
    loaded.model.eval()
    with torch.no_grad():
        assert torch.equal(run.model(**ids).logits, loaded.model(**ids).logits)
