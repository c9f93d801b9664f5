"""`objective: dpo` (and KTO, which also has a reference) with every method of the matrix: each trains a step
on the tiny models, its reference is the base (the adapter switched off, or log-probs precomputed before the
first step for methods that train or rewrite the base), and the run's model is left as TRL found it."""

from __future__ import annotations

import copy
import math

import pytest
from conftest import tiny_gpt2, tiny_llama, tiny_mixtral
from test_method_matrix import CASES

import nbtune
from nbtune.config import RunConfig
from nbtune.data.demo import demo_pair_splits
from nbtune.engine.bases.loading import load_base
from nbtune.errors import ConfigError
from nbtune.methods import get_method

PAIRS = demo_pair_splits()[0][:8]


def fresh_base(case, chat, plain, saved_dir):
    if case.arch == "llama-saved":
        base = load_base(str(saved_dir), quantization=case.options.get("quantization", "4bit"))
        return base.model, base.tokenizer
    tokenizer = copy.deepcopy(plain if case.arch == "gpt2" else chat)
    return {"llama": tiny_llama, "gpt2": tiny_gpt2, "mixtral": tiny_mixtral}[case.arch](tokenizer), tokenizer


@pytest.mark.parametrize("case", CASES, ids=str)
def test_dpo_trains_with_every_method_against_the_base(case, chat_tokenizer, plain_tokenizer, tiny_model_dir):
    options = {k: v for k, v in case.options.items() if k != "quantization"}
    quantization = case.options.get("quantization")
    config = dict(data=PAIRS, method=case.method, objective="dpo", steps=1, batch_size=2, lr=case.lr, metric="none",
                  save=False, max_length=96, **({"quantization": quantization} if quantization else {}), **options)
    spec = get_method(case.method)
    checked = spec.check_options(options, RunConfig.parse(method=case.method))
    # AdaLoRA (one adapter per model) and PiSSA (its init rewrites the base): refused by name, first
    if not spec.allows_second_adapter(checked) or (spec.adds_modules(checked) and not spec.keeps_base(checked)):
        with pytest.raises(ConfigError, match=r"cannot train with `objective: dpo`.*objective: orpo"):
            nbtune.finetune(**config)
        config["objective"] = "orpo"  # no reference, no second adapter
    run = nbtune.finetune(base=fresh_base(case, chat_tokenizer, plain_tokenizer, tiny_model_dir), **config)
    assert run.status == "finished" and math.isfinite(run.history[0]["loss"])
    assert ("reward_margin" if config["objective"] == "dpo" else "logp_margin") in run.history[0]
    assert "ref" not in getattr(run.model, "peft_config", {})  # no second adapter stays, whatever the method
    inner = run.model.get_base_model() if hasattr(run.model, "get_base_model") else run.model
    assert "forward" not in inner.__dict__


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_orpo_and_simpo_train_with_the_prompt_methods(chat_tokenizer, objective, method):
    """Virtual tokens lengthen the logits; ORPO's and SimPO's forward keeps the real tokens' positions."""
    run = nbtune.finetune(data=PAIRS, base=(tiny_llama(chat_tokenizer), chat_tokenizer), method=method,
                          objective=objective, steps=1, batch_size=2, lr=3e-2, metric="none", save=False,
                          max_length=96)
    assert run.status == "finished" and math.isfinite(run.history[0]["loss"]) and run.history[0]["tokens"] > 0
