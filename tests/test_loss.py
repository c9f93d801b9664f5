"""The answer-only loss: the LM head evaluated only at labelled positions gives the model's own loss and
gradients, for plain models, LoRA, prompt tuning (virtual tokens in front) and a mixture of experts."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from transformers import TrainingArguments

import nbtune
from nbtune.engine.training.loss import IGNORE, AnswerOnlyLossTrainer


def _batch(vocab: int, rows: int = 3, length: int = 14) -> dict[str, torch.Tensor]:
    """Rows whose answers start and end at different positions, with right padding, as the collator makes."""
    torch.manual_seed(1)
    input_ids = torch.randint(3, vocab, (rows, length))
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    for row in range(rows):
        answer_start, end = 4 + 2 * row, length - row
        labels[row, :answer_start] = IGNORE
        labels[row, end:] = IGNORE
        attention_mask[row, end:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _trainer(model, tmp_path, labels_only: bool = True) -> AnswerOnlyLossTrainer:
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    return AnswerOnlyLossTrainer(model=model, args=args, labels_only=labels_only)


def _loss_and_grads(loss_fn, model):
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads


def _assert_same_as_models_own_loss(model, tmp_path, vocab):
    model.train()
    torch.manual_seed(0)
    batch = _batch(vocab)
    trainer = _trainer(model, tmp_path)
    mine, my_grads = _loss_and_grads(lambda: trainer.compute_loss(model, dict(batch)), model)
    own, own_grads = _loss_and_grads(lambda: model(**batch).loss, model)
    assert trainer.labels_only, "fell back to the full-logits loss"
    assert torch.allclose(mine, own, rtol=1e-5, atol=1e-6), (mine, own)
    assert my_grads.keys() == own_grads.keys() and my_grads
    for name, grad in my_grads.items():
        assert torch.allclose(grad, own_grads[name], rtol=1e-4, atol=1e-6), name


def _no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def test_plain_llama_full_parameters(chat_tokenizer, tmp_path):
    _assert_same_as_models_own_loss(tiny_llama(chat_tokenizer), tmp_path, len(chat_tokenizer))


def test_plain_gpt2(plain_tokenizer, tmp_path):
    _assert_same_as_models_own_loss(_no_dropout(tiny_gpt2(plain_tokenizer)), tmp_path, len(plain_tokenizer))


def test_lora_through_peft(chat_tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(chat_tokenizer), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0,
                                                                   init_lora_weights=False))
    _assert_same_as_models_own_loss(model, tmp_path, len(chat_tokenizer))


def test_prompt_tuning_skips_its_virtual_tokens(chat_tokenizer, tmp_path):
    from peft import PromptTuningConfig, get_peft_model

    model = get_peft_model(tiny_llama(chat_tokenizer), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    _assert_same_as_models_own_loss(model, tmp_path, len(chat_tokenizer))


def test_mixture_of_experts_keeps_its_router_loss(chat_tokenizer, tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=len(chat_tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           output_router_logits=True, router_aux_loss_coef=0.5)
    _assert_same_as_models_own_loss(MixtralForCausalLM(config), tmp_path, len(chat_tokenizer))


def test_the_head_sees_only_labelled_rows(chat_tokenizer, tmp_path):
    model = tiny_llama(chat_tokenizer)
    batch = _batch(len(chat_tokenizer))
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape))
    _trainer(model, tmp_path).compute_loss(model, dict(batch))
    labelled = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert seen == [torch.Size([1, labelled, 64])]
    assert labelled < batch["input_ids"].numel()  # prompt and padding positions never reach the head


def test_switched_off_it_is_the_trainers_own_loss(chat_tokenizer, tmp_path):
    model = tiny_llama(chat_tokenizer)
    batch = _batch(len(chat_tokenizer))
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape))
    loss = _trainer(model, tmp_path, labels_only=False).compute_loss(model, dict(batch))
    assert seen[0][:2] == batch["input_ids"].shape
    assert torch.allclose(loss, model(**batch).loss)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_a_run_has_the_same_loss_curve_either_way(llama_base, demo_rows, grad_accum):
    import copy

    curves = []
    for labels_only in (True, False):
        model, tokenizer = copy.deepcopy(llama_base[0]), llama_base[1]
        run = nbtune.finetune(data=demo_rows, base=(model, tokenizer), steps=4, batch_size=4, grad_accum=grad_accum,
                              lr=1e-2, eval_split=0.25, metric="none", save=False,
                              logits_on_labels_only=labels_only)
        curves.append([r["loss"] for r in run.history] + [run.metrics["eval_loss"]])
    assert curves[0] == pytest.approx(curves[1], rel=1e-4)
