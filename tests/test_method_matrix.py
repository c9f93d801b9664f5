"""Every method through the same checks, on tiny random Llama and GPT-2 models (and a tiny Mixtral for MoE).

1. it trains: the loss falls on a small memorisation set;
2. only the method's parameters change; everything frozen stays bit-identical;
3. the reported trainable count equals the requires_grad numel;
4. save -> load onto a fresh base -> bit-identical logits;
5. switching the method off gives exactly the base model's logits (or a clear refusal);
6. merging gives the unmerged logits within 1e-5 of their scale (or a clear refusal);
7. the same seed gives the same loss curve.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from conftest import logits_of, tiny_gpt2, tiny_llama, tiny_mixtral

import nbtune
from nbtune.engine.bases.loading import load_base

PROMPT = "Convert this date to ISO format (YYYY-MM-DD): 9 Nov 1989"


@dataclass(frozen=True)
class Case:
    method: str
    arch: str = "llama"
    options: dict[str, Any] = field(default_factory=dict)
    lr: float = 1e-2
    disables: bool = True  # False: switching back to the base is refused (weights trained in place)
    merges: bool = False
    base_untouched: bool = True  # False: the method rewrites frozen base weights by design (PiSSA)
    exact_reload: bool = True  # False: the saved form is re-shaped (PiSSA -> LoRA, AdaLoRA's pruned ranks)
    id: str = ""

    def __str__(self) -> str:
        return self.id or f"{self.method}-{self.arch}"


CASES = [
    Case("full", lr=1e-3, disables=False),
    Case("full", "gpt2", lr=1e-3, disables=False),
    Case("freeze", options={"trainable_layers": 1}, lr=1e-3, disables=False),
    Case("freeze", "gpt2", options={"trainable_layers": 1}, lr=1e-3, disables=False),
    Case("houlsby", options={"reduction_factor": 4}),
    Case("houlsby", "gpt2", options={"reduction_factor": 4}),
    Case("pfeiffer", options={"reduction_factor": 4}),
    Case("lora", merges=True),
    Case("lora", "gpt2", merges=True),
    Case("lora", options={"rslora": True}, merges=True, id="lora-rslora"),
    Case("lora", options={"init": "pissa"}, merges=True, base_untouched=False, exact_reload=False, id="lora-pissa"),
    Case("dora", merges=True),
    Case("dora", "gpt2", merges=True),
    Case("qlora", "llama-saved", id="qlora-4bit"),
    Case("qlora", "llama-saved", options={"quantization": "8bit"}, id="qlora-8bit"),
    Case("adalora", options={"init_r": 8, "target_r": 4}, merges=True, exact_reload=False),
    Case("loraplus", merges=True),
    Case("prefix", lr=1e-2),
    Case("prefix", "gpt2", lr=1e-2),
    Case("ptuning_v2", lr=3e-2),
    Case("prompt", lr=3e-2),
    Case("prompt", options={"init": "text", "init_text": "Convert the date"}, lr=3e-2, id="prompt-text-init"),
    Case("ptuning", lr=1e-2),
    Case("ia3", lr=3e-2, merges=True),
    Case("ia3", "gpt2", lr=3e-2, merges=True),
    Case("bitfit", "gpt2", lr=3e-2),
    Case("ln_tuning", lr=3e-2, merges=True),
    Case("peft", options={"peft_type": "loha", "peft_args": {"r": 4, "target_modules": ["q_proj", "v_proj"]}},
         merges=True, id="peft-loha"),
    Case("peft", options={"peft_type": "vera", "peft_args": {"r": 16, "target_modules": ["q_proj", "v_proj"]}},
         lr=3e-2, merges=True, id="peft-vera"),
    Case("moe", "mixtral", options={"moe_train": "lora"}, merges=True, id="moe-lora"),
    Case("moe", "mixtral", options={"moe_train": "experts"}, lr=1e-3, disables=False, id="moe-experts"),
    Case("moe", "mixtral", options={"moe_train": "router"}, lr=3e-2, id="moe-router"),
]


class Matrix:
    """Trains each case once (twice for the seed check) and keeps the runs for the checks."""

    def __init__(self, chat, plain, saved_dir, rows, tmp):
        self.chat, self.plain, self.saved_dir, self.rows, self.tmp = chat, plain, saved_dir, rows, tmp
        self.runs: dict[str, Any] = {}

    def fresh_base(self, case: Case):
        quantization = case.options.get("quantization", "4bit" if case.method == "qlora" else "none")
        if case.arch == "llama-saved":
            base = load_base(str(self.saved_dir), quantization=quantization)
            return base.model, base.tokenizer
        tokenizer = copy.deepcopy(self.plain if case.arch == "gpt2" else self.chat)
        build = {"llama": tiny_llama, "gpt2": tiny_gpt2, "mixtral": tiny_mixtral}[case.arch]
        return build(tokenizer), tokenizer

    def train(self, case: Case, *, again: bool = False):
        key = f"{case}{'-again' if again else ''}"
        if key not in self.runs:
            settings = dict(case.options)
            settings.update(steps=12, batch_size=8, lr=case.lr, metric="none", seed=3, lr_scheduler="constant",
                            output_dir=str(self.tmp / key))
            self.runs[key] = nbtune.finetune(data=self.rows, method=case.method, base=self.fresh_base(case),
                                             **settings)
        return self.runs[key]


@pytest.fixture(scope="module")
def matrix(_chat_tokenizer, _plain_tokenizer, tiny_model_dir, tmp_path_factory):
    from nbtune.data.demo import demo_splits

    rows = demo_splits()[0][:8]  # one batch, seen every step: a memorisation set
    return Matrix(_chat_tokenizer, _plain_tokenizer, tiny_model_dir, rows, tmp_path_factory.mktemp("matrix"))


def logits(model, tokenizer, text=PROMPT):
    model.eval()
    return logits_of(model, tokenizer(text, return_tensors="pt"))  # on the device runs train on


def close(a: torch.Tensor, b: torch.Tensor, tolerance: float = 1e-5) -> bool:
    """Equal up to float32 rounding: max difference within `tolerance` x the logits' own scale.

    Merging or re-shaping sums the same numbers in another order; on the tiny models' logits (tens)
    that moves the last bits, about 1e-6 relative.
    """
    return bool((a - b).abs().max() <= tolerance * max(1.0, b.abs().max().item()))


def base_name(name: str) -> str:
    """A parameter's name in the plain base model (peft wraps names in base_model.model / base_layer)."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


# ---------------------------------------------------------------------------------------------- checks
@pytest.mark.parametrize("case", CASES, ids=str)
def test_1_it_trains(matrix, case):
    run = matrix.train(case)
    losses = [r["loss"] for r in run.history]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < losses[0], losses


@pytest.mark.parametrize("case", [c for c in CASES if c.base_untouched], ids=str)
def test_2_only_the_methods_parameters_change(matrix, case):
    run = matrix.train(case)
    fresh = dict(matrix.fresh_base(case)[0].named_parameters())
    changed = []
    for name, param in run.model.named_parameters():
        original = fresh.get(base_name(name))
        if param.requires_grad:
            if original is None or not torch.equal(param.cpu(), original):
                changed.append(name)
        elif original is not None:
            assert torch.equal(param.cpu(), original), f"frozen {name} changed"
    assert changed, "nothing trainable changed"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_3_trainable_count_matches_requires_grad(matrix, case):
    run = matrix.train(case)
    assert run.metrics["trainable_params"] == sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    assert 0 < run.metrics["trainable_params"] <= run.metrics["total_params"]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_4_save_and_load_give_identical_logits(matrix, case, tmp_path):
    run = matrix.train(case)
    path = run.save(tmp_path / "saved")
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))  # safetensors only, no pickles
    loaded = nbtune.load(path, base=matrix.fresh_base(case))
    reloaded, trained = logits(loaded.model, run.tokenizer), logits(run.model, run.tokenizer)
    assert torch.equal(reloaded, trained) if case.exact_reload else close(reloaded, trained)


@pytest.mark.parametrize("case", [c for c in CASES if c.base_untouched], ids=str)
def test_5_switching_the_method_off_gives_the_base(matrix, case):
    run = matrix.train(case)
    base_model, _ = matrix.fresh_base(case)
    if not case.disables:
        with pytest.raises(nbtune.NbtuneError, match=r"in place|originals"):
            run.base_disabled().__enter__()
        return
    trained = logits(run.model, run.tokenizer)
    with run.base_disabled():
        assert torch.equal(logits(run.model, run.tokenizer), logits(base_model, run.tokenizer))
    assert torch.equal(logits(run.model, run.tokenizer), trained)  # and back on afterwards
    assert not torch.equal(trained, logits(base_model, run.tokenizer))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_6_merge_keeps_the_outputs_or_says_why_not(matrix, case, tmp_path):
    run = matrix.train(case)
    copy_of_run = nbtune.load(run.save(tmp_path / "to-merge"), base=matrix.fresh_base(case))
    before = logits(copy_of_run.model, run.tokenizer)
    if not case.merges:
        with pytest.raises(nbtune.NbtuneError, match="merge"):
            copy_of_run.merge()
        return
    merged = copy_of_run.merge()
    assert not hasattr(merged, "peft_config")  # a plain transformers model again
    assert close(logits(merged, run.tokenizer), before)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_7_same_seed_same_loss_curve(matrix, case):
    first = [r["loss"] for r in matrix.train(case).history]
    second = [r["loss"] for r in matrix.train(case, again=True).history]
    assert first == second
