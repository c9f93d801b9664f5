"""Module names in a method's names options: each must match a module (or, for freeze, a parameter name),
or the run is refused before training, naming the stray name with a did-you-mean, instead of peft
quietly dropping it as long as another name matches."""

from __future__ import annotations

import pytest
from conftest import tiny_gpt2

import nbtune

FAST = {"r": 4, "steps": 2, "batch_size": 4, "metric": "none", "save": False}


def _refused(base, rows, **options) -> str:
    with pytest.raises(nbtune.MethodError) as caught:
        nbtune.finetune(data=rows, base=base, **options)
    message = str(caught.value)
    assert "\n" not in message  # one line, never peft's traceback
    return message


def test_lora_refuses_a_misspelled_target_and_suggests_the_module(llama_base, demo_rows):
    message = _refused(llama_base, demo_rows, method="lora", target_modules=["q_proj", "v_prj"], **FAST)
    assert "`v_prj`" in message and "Did you mean `v_proj`?" in message
    assert "`q_proj`" not in message.split("Did you mean")[0]  # only the name that matches nothing
    assert "down_proj, gate_proj, k_proj" in message  # the model's linear modules to choose from


def test_every_stray_name_is_named_at_once(llama_base, demo_rows):
    message = _refused(llama_base, demo_rows, method="lora", target_modules=["q_prj", "v_prj", "o_proj"], **FAST)
    assert "`q_prj`, `v_prj`" in message and "`q_proj` for `q_prj`" in message and "`v_proj` for `v_prj`" in message


def test_ia3_refuses_a_target_that_matches_nothing(llama_base, demo_rows):
    message = _refused(llama_base, demo_rows, method="ia3", target_modules=["k_proj", "nope"], steps=2,
                       batch_size=4, metric="none", save=False)
    assert "`target_modules`" in message and "`nope`" in message


def test_ia3_refuses_a_feedforward_module_that_matches_nothing(llama_base, demo_rows):
    # Before: IA3Config's bare ValueError that feedforward_modules must be a subset of target_modules.
    message = _refused(llama_base, demo_rows, method="ia3", feedforward_modules=["nope"], steps=2, batch_size=4,
                       metric="none", save=False)
    assert "`feedforward_modules`" in message and "`nope`" in message


@pytest.mark.parametrize(("method", "options", "stray", "hint"), [
    ("adalora", {"target_modules": ["q_proj", "v_prj"], "steps": 4}, "v_prj", "v_proj"),
    ("ln_tuning", {"target_modules": ["norm", "nrom"]}, "nrom", "norm"),
    ("peft", {"peft_type": "vera", "peft_args": {"target_modules": ["q_proj", "v_prj"]}}, "v_prj", "v_proj"),
    ("peft", {"peft_type": "loha", "peft_args": {"target_modules": ["q_proj", "v_prj"]}}, "v_prj", "v_proj"),
])
def test_other_peft_methods_refuse_a_stray_target(llama_base, demo_rows, method, options, stray, hint):
    settings = {"steps": 2, "batch_size": 4, "metric": "none", "save": False, **options}
    message = _refused(llama_base, demo_rows, method=method, **settings)
    assert f"`{stray}`" in message and f"Did you mean `{hint}`?" in message


def test_freeze_refuses_a_trainable_module_in_no_parameter_name(llama_base, demo_rows):
    message = _refused(llama_base, demo_rows, method="freeze", trainable_modules=["nrom"], steps=2, batch_size=4,
                       metric="none", save=False)
    assert "`trainable_modules`" in message and "`nrom`" in message and "Did you mean `norm`?" in message


def test_correct_names_still_train_what_they_name(llama_base, demo_rows):
    run = nbtune.finetune(data=demo_rows, base=llama_base, method="lora",
                          target_modules=["q_proj", "self_attn.v_proj"], **FAST)
    trained = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in run.model.named_parameters() if p.requires_grad}
    assert trained == {"q_proj", "v_proj"}


@pytest.mark.parametrize(("method", "options"), [
    ("ia3", {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}),
    ("ia3", {}),
    ("ln_tuning", {"target_modules": ["norm"]}),
    ("freeze", {"trainable_layers": 0, "trainable_modules": ["norm", "layers.1.mlp"]}),
])
@pytest.mark.filterwarnings("ignore:Unsupported layer type")  # peft's LN tuning on RMSNorm, as by default
def test_correct_lists_of_other_methods_still_train(llama_base, demo_rows, method, options):
    run = nbtune.finetune(data=demo_rows, base=llama_base, method=method, steps=2, batch_size=4, metric="none",
                          save=False, **options)
    assert run.status == "finished" and run.metrics["trainable_params"] > 0


def test_gpt2_conv1d_modules_are_named_by_their_own_names(gpt2_base, plain_tokenizer, demo_rows):
    run = nbtune.finetune(data=demo_rows, base=gpt2_base, method="lora", target_modules=["c_attn", "mlp.c_proj"],
                          **FAST)
    trained = {n.split(".lora_")[0] for n, p in run.model.named_parameters() if p.requires_grad}
    assert {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in trained} == {"attn.c_attn", "mlp.c_proj"}
    fresh = (tiny_gpt2(plain_tokenizer), plain_tokenizer)  # the first run's adapter sits in gpt2_base now
    message = _refused(fresh, demo_rows, method="lora", target_modules=["c_atn"], **FAST)
    assert "Did you mean `c_attn`?" in message and "c_attn, c_fc, c_proj" in message


def test_a_name_matches_exactly_when_peft_matches_it(llama_base):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from nbtune.methods.common import module_suffixes

    model, _ = llama_base
    keys = [k for k, _ in model.named_modules() if k]
    known = module_suffixes(model)
    names = ["q_proj", "self_attn.q_proj", "layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj",
             "proj", "elf_attn.q_proj", ".q_proj", "lm_head", "0", "layers.0", "mlp", "norm", "model", "nope"]
    for name in names:
        by_peft = any(check_target_module_exists(LoraConfig(target_modules=[name]), key) for key in keys)
        assert (name in known) == by_peft, name
