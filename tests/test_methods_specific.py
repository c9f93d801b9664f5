"""What individual methods promise beyond the shared matrix: AdaLoRA's shrinking budget, LoRA+'s learning
rates, NEFTune with every method, bottleneck removal, and the clear refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import finetune_interrupted, tiny_gpt2, tiny_llama
from test_method_matrix import logits, tiny_mixtral

import nbtune
from nbtune.engine.training.events import NullObserver

FAST = {"steps": 6, "batch_size": 8, "metric": "none", "save": False}


def test_adalora_fills_total_step_and_its_rank_budget_shrinks(llama_base, demo_rows):
    run = nbtune.finetune(data=demo_rows, base=llama_base, method="adalora", init_r=8, target_r=2, steps=10,
                          batch_size=8, metric="none", save=False)
    assert run.model.peft_config["default"].total_step == 10
    ranks = [r["adalora_rank"] for r in run.history]
    assert ranks == sorted(ranks, reverse=True) and ranks[-1] <= ranks[0] // 2, ranks


def test_adalora_refuses_a_schedule_longer_than_the_run(llama_base, demo_rows):
    with pytest.raises(nbtune.MethodError, match="tinit"):
        nbtune.finetune(data=demo_rows, base=llama_base, method="adalora", tinit=4, tfinal=4, **FAST)


def test_loraplus_puts_the_b_matrices_on_a_higher_learning_rate(llama_base, demo_rows):
    from nbtune.methods.lora_variants import _loraplus_optimizer

    run = nbtune.finetune(data=demo_rows, base=llama_base, method="loraplus", loraplus_lr_ratio=8, lr=1e-3,
                          **FAST)

    class Args:  # the two TrainingArguments fields the optimizer factory reads
        learning_rate, weight_decay = 1e-3, 0.0

    groups = _loraplus_optimizer(run.model, Args(), run.context).param_groups
    lrs = sorted({g["lr"] for g in groups if g["params"]})
    assert lrs == [pytest.approx(1e-3), pytest.approx(8e-3)]
    b_ids = {id(p) for n, p in run.model.named_parameters() if "lora_B" in n}
    assert b_ids == {id(p) for g in groups if g["lr"] == pytest.approx(8e-3) for p in g["params"]}


NEFTUNE_CASES = [(m, "llama") for m in ("full", "freeze", "houlsby", "lora", "dora", "adalora", "loraplus",
                                         "prefix", "ptuning_v2", "prompt", "ptuning", "ia3", "ln_tuning")]
NEFTUNE_CASES += [(m, "gpt2") for m in ("lora", "prefix", "prompt", "ptuning", "bitfit", "houlsby")]


@pytest.mark.parametrize(("method", "arch"), NEFTUNE_CASES, ids=[f"{m}-{a}" for m, a in NEFTUNE_CASES])
def test_neftune_adds_noise_in_training_only_with_every_method(chat_tokenizer, plain_tokenizer, demo_rows, method,
                                                               arch):
    probes = []

    class Probe(NullObserver):
        def on_step(self, run, record):
            embed = run.model.get_input_embeddings()
            ids = torch.tensor([[3, 4, 5]], device=embed.weight.device)
            with torch.no_grad():
                probes.append(not torch.equal(embed(ids), embed(ids)))  # training mode: noisy, twice different

    base = (tiny_llama(chat_tokenizer), chat_tokenizer) if arch == "llama" else (tiny_gpt2(plain_tokenizer),
                                                                                 plain_tokenizer)
    run = nbtune.finetune(data=demo_rows, base=base, method=method, neftune_alpha=5.0, observers=[Probe()], **FAST)
    assert run.status == "finished" and all(torch.isfinite(torch.tensor([r["loss"] for r in run.history])))
    assert all(probes), "no NEFTune noise while training"
    embed = run.model.get_input_embeddings()
    embed.train()
    ids = torch.tensor([[3, 4, 5]], device=embed.weight.device)
    assert torch.equal(embed(ids), embed(ids)), "NEFTune noise left on after training"


def test_bitfit_on_a_model_without_biases_names_the_alternatives(llama_base, demo_rows):
    with pytest.raises(nbtune.MethodError, match="has none") as info:
        nbtune.finetune(data=demo_rows, base=llama_base, method="bitfit", **FAST)
    assert "ia3" in str(info.value) and "ln_tuning" in str(info.value)


def test_bitfit_saves_only_the_biases(gpt2_base, demo_rows, tmp_path):
    run = nbtune.finetune(data=demo_rows, base=gpt2_base, method="bitfit", **FAST)
    path = run.save(tmp_path / "bitfit")
    from safetensors.torch import load_file

    saved = load_file(str(path / "trained_tensors.safetensors"))
    assert saved and all(name.endswith(".bias") for name in saved)
    assert sum(t.numel() for t in saved.values()) == run.metrics["trainable_params"]


def test_moe_on_a_dense_model_is_refused(llama_base, demo_rows):
    with pytest.raises(nbtune.MethodError, match="dense"):
        nbtune.finetune(data=demo_rows, base=llama_base, method="moe", **FAST)


def test_moe_router_trains_only_the_gates(chat_tokenizer, demo_rows):
    run = nbtune.finetune(data=demo_rows, base=(tiny_mixtral(chat_tokenizer), chat_tokenizer), method="moe",
                          moe_train="router", **FAST)
    trained = [n for n, p in run.model.named_parameters() if p.requires_grad]
    assert trained and all(n.endswith("mlp.gate.weight") for n in trained)


def test_houlsby_adds_twice_pfeiffers_adapters_and_removal_restores_the_base(chat_tokenizer, demo_rows):
    from nbtune.methods import bottleneck

    counts = {}
    for method in ("houlsby", "pfeiffer"):
        run = nbtune.finetune(data=demo_rows, base=(tiny_llama(chat_tokenizer), chat_tokenizer), method=method,
                              reduction_factor=4, **FAST)
        counts[method] = run.metrics["trainable_params"]
    assert counts["houlsby"] == 2 * counts["pfeiffer"]
    base = logits(tiny_llama(chat_tokenizer), run.tokenizer)
    assert not torch.equal(logits(run.model, run.tokenizer), base)
    bottleneck.remove(run.model)
    assert torch.equal(logits(run.model, run.tokenizer), base)
    assert not any(".nbtune_adapter_" in n for n, _ in run.model.named_parameters())


def test_prompt_methods_switch_gradient_checkpointing_off(llama_base, demo_rows):
    run = nbtune.finetune(data=demo_rows, base=llama_base, method="prefix", gradient_checkpointing=True, **FAST)
    assert run.status == "finished"
    assert not getattr(run.model.get_base_model(), "is_gradient_checkpointing", False)


def test_a_4bit_merge_explains_the_full_precision_path(tiny_model_dir, demo_rows):
    pytest.importorskip("bitsandbytes")
    run = nbtune.finetune(model=str(tiny_model_dir), method="qlora", data=demo_rows, **FAST)
    with pytest.raises(nbtune.NbtuneError, match="quantization='none'"):
        run.merge()


@pytest.mark.parametrize(("method", "options", "match"), [
    ("prompt", {"num_virtual_tokens": 0}, "num_virtual_tokens"),
    ("prompt", {"init": "text"}, "init_text"),
    ("ia3", {"target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}, "feedforward_modules"),
    ("peft", {"peft_type": "verra"}, "Did you mean `vera`"),
    ("peft", {"peft_type": "vera", "peft_args": {"rank": 4}}, "peft_args"),
    ("peft", {"peft_type": "vera", "peft_args": [1]}, "peft_args"),
    ("adalora", {"init_r": 4, "target_r": 8}, "target_r"),
    ("houlsby", {"reduction_factor": 0}, "reduction_factor"),
    ("moe", {"moe_train": "gates"}, "moe_train"),
])
def test_method_options_are_checked_before_any_model_loads(method, options, match):
    with pytest.raises(nbtune.NbtuneError, match=match):
        nbtune.finetune(model="./no/such/model", method=method, **options)


def test_ia3_targets_that_match_nothing_list_the_real_modules(gpt2_base, demo_rows):
    with pytest.raises(nbtune.MethodError, match="c_attn"):
        nbtune.finetune(data=demo_rows, base=gpt2_base, method="ia3", target_modules=["q_proj"],
                        feedforward_modules=[], **FAST)


def test_gpt2_gets_ia3_defaults_for_its_architecture(plain_tokenizer, demo_rows):
    run = nbtune.finetune(data=demo_rows, base=(tiny_gpt2(plain_tokenizer), plain_tokenizer), method="ia3", **FAST)
    config = run.model.peft_config["default"]
    assert set(config.target_modules) == {"c_attn", "mlp.c_proj"} and set(config.feedforward_modules) == {
        "mlp.c_proj"}


def test_an_interrupt_leaves_no_neftune_noise_behind(llama_base, demo_rows):
    class Interrupt(NullObserver):
        def on_step(self, run, record):
            if record["step"] == 2:
                raise KeyboardInterrupt

    run = finetune_interrupted(data=demo_rows, base=llama_base, neftune_alpha=5.0, observers=[Interrupt()],
                               **{**FAST, "steps": 5})
    assert run.status == "stopped"
    embed = run.model.get_input_embeddings()
    embed.train()
    ids = torch.tensor([[3, 4, 5]], device=embed.weight.device)
    assert torch.equal(embed(ids), embed(ids))


@pytest.mark.parametrize("method", ["prefix", "ptuning", "adalora"])
def test_methods_peft_cannot_checkpoint_for_training_refuse_to_resume(llama_base, demo_rows, method):
    class StopAtTwo(NullObserver):
        def on_step(self, run, record):
            if record["step"] == 2:
                run.stop()

    options = {"init_r": 8, "target_r": 4} if method == "adalora" else {}
    run = nbtune.finetune(data=demo_rows, base=llama_base, method=method, observers=[StopAtTwo()],
                          **{**FAST, "steps": 6}, **options)
    assert run.status == "stopped"
    with pytest.raises(nbtune.NbtuneError, match="cannot resume"):
        run.resume()


def test_a_stop_on_the_last_step_finishes_the_run(llama_base, demo_rows):
    class StopAtEnd(NullObserver):
        def on_step(self, run, record):
            if record["step"] == 3:
                run.stop()

    run = nbtune.finetune(data=demo_rows, base=llama_base, observers=[StopAtEnd()], **{**FAST, "steps": 3})
    assert run.status == "finished" and not run.stop_requested


def test_elapsed_time_goes_on_across_a_resume(llama_base, demo_rows):
    class StopAtTwo(NullObserver):
        def on_step(self, run, record):
            if record["step"] == 2 and not getattr(self, "done", False):
                self.done = True
                run.stop()

    run = nbtune.finetune(data=demo_rows, base=llama_base, observers=[StopAtTwo()], **{**FAST, "steps": 4})
    run.resume()
    elapsed = [r["elapsed_seconds"] for r in run.history]
    assert elapsed == sorted(elapsed) and len(elapsed) == 4


def test_a_peft_passthrough_with_a_base_rewriting_init_does_not_share_the_base():
    spec = nbtune.methods("peft")
    assert not spec.keeps_base({"peft_type": "lora", "peft_args": {"init_lora_weights": "pissa"}})
    assert spec.keeps_base({"peft_type": "lora", "peft_args": {"r": 4}})


def test_freeze_refuses_more_trainable_layers_than_the_model_has(llama_base, demo_rows):
    with pytest.raises(nbtune.MethodError, match=r"`trainable_layers` is 5, but this model has 2 decoder layers"):
        nbtune.finetune(data=demo_rows, base=llama_base, method="freeze", trainable_layers=5, **FAST)


def test_plain_lora_on_a_moe_model_names_the_dropout_it_cannot_have(chat_tokenizer, demo_rows):
    from conftest import tiny_mixtral

    with pytest.raises(nbtune.MethodError, match=r"set `dropout: 0`, or use `method: moe`"):
        nbtune.finetune(data=demo_rows, base=(tiny_mixtral(chat_tokenizer), chat_tokenizer), **FAST)
    run = nbtune.finetune(data=demo_rows, base=(tiny_mixtral(chat_tokenizer), chat_tokenizer), dropout=0.0,
                          **{**FAST, "steps": 1})
    assert run.status == "finished"
