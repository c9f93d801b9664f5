"""Each preference objective's loss, recomputed by hand on one real batch of the trainer nbtune builds.

The batch is the one TRL's trainer (nbtune's subclass of it) trained on at the last step of a short run on the
tiny Llama, in fp32, without dropout; the model is the one it trained at that moment. The loss is recomputed
from that batch's token ids with plain torch: one forward of the model (and of an untouched copy of the base,
the reference), a log-softmax, the answer tokens picked out by where the prompt ends, and the paper's formula.
It must equal what the trainer computed, to float32 rounding. So a loss that scores a token it should not (ORPO
scoring the prompt) or leaves one out fails here, whatever the preview or README says.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import nbtune
from nbtune.data.demo import demo_pair_splits
from nbtune.objectives import get_objective

RUN = {"steps": 2, "batch_size": 4, "lr": 5e-2, "metric": "none", "save": False, "max_length": 96,
       "precision": "fp32", "dropout": 0.0}


def last_batch(llama_base, monkeypatch, objective, **config):
    """(the last training batch, the trainer's loss on it, the model as it was then, an untouched copy of the
    base) from a short `objective` run; the hand computation runs inside the step, before the weights move."""
    trainer_class = get_objective(objective).trainer_class()
    reference = copy.deepcopy(llama_base[0]).eval()
    seen: dict = {}
    real = trainer_class.compute_loss

    def watching(self, model, inputs, *args, **kwargs):
        loss = real(self, model, inputs, *args, **kwargs)
        if model.training and self.state.global_step == self.state.max_steps - 1:  # the last step
            with torch.no_grad():
                seen.update(batch=inputs, loss=loss.detach().item(), by_hand=BY_HAND[objective](
                    model, reference, inputs, self.beta, **config))
                if objective == "orpo":  # the other reading of ORPO's NLL term, on the same batch
                    seen["other"] = orpo_by_hand(model, reference, inputs, self.beta,
                                                 train_on_prompt=not config.get("train_on_prompt"))
        return loss

    monkeypatch.setattr(trainer_class, "compute_loss", watching)
    rows = demo_pair_splits()[0][:8]
    run = nbtune.finetune(data=rows, base=llama_base, objective=objective, **{**RUN, **config})
    assert run.status == "finished" and seen
    return seen


def logps(model, ids, attention, answer):
    """Per sequence: the log-probs of its answer tokens (the model's log-softmax at the position before each),
    summed, and the number of those tokens."""
    logits = model(input_ids=ids, attention_mask=attention).logits.float()
    per_token = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, ids[:, 1:, None]).squeeze(2)
    mask = answer[:, 1:].float()
    return (per_token * mask).sum(1), mask.sum(1)


def answers_after(prompt_lengths, attention):
    """1 at the tokens after each sequence's prompt that are no padding: its answer."""
    positions = torch.arange(attention.shape[1])[None, :]
    return ((positions >= prompt_lengths[:, None]) & attention.bool()).long()


def dpo_by_hand(model, reference, batch, beta):
    """DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta x ((policy - reference) log-prob of the chosen
    answer - the same for the rejected)), mean over pairs; rows are [chosen..., rejected...]."""
    ids, attention, answer = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    policy, _ = logps(model, ids, attention, answer)
    base, _ = logps(reference, ids, attention, answer)
    ratios = (policy - base).chunk(2)
    assert ratios[0].abs().max() > 1e-3  # the model has moved from its reference: not log(2) by construction
    return -F.logsigmoid(beta * (ratios[0] - ratios[1])).mean().item()


def pair_answers(batch, side):
    """A TRL ORPO / CPO batch's `side` sequences and their answer tokens, from the prompt's own length."""
    ids, attention = batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"]
    answer = answers_after(batch["prompt_attention_mask"].sum(1), attention)
    assert torch.equal(answer.bool(), batch[f"{side}_labels"] != -100)  # TRL marks the same tokens
    return ids, attention, answer


def simpo_by_hand(model, reference, batch, beta, gamma=0.5):
    """SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta x (chosen's - rejected's average log-prob per answer
    token) - gamma), mean over pairs (TRL's simpo_gamma 0.5)."""
    averages = []
    for side in ("chosen", "rejected"):
        total, count = logps(model, *pair_answers(batch, side))
        averages.append(total / count)
    return -F.logsigmoid(beta * (averages[0] - averages[1]) - gamma).mean().item()


def orpo_by_hand(model, reference, batch, beta, train_on_prompt=False):
    """ORPO (Hong et al. 2024, eq. 6-7): the chosen answer's NLL (mean over its tokens; with
    `train_on_prompt` over every token of the chosen chat) - beta x log sigmoid(log odds(chosen) - log
    odds(rejected)), with odds(y) = P / (1 - P) of the answer's average log-prob per token."""
    averages = []
    for side in ("chosen", "rejected"):
        total, count = logps(model, *pair_answers(batch, side))
        averages.append(total / count)
    ids, attention, answer = pair_answers(batch, "chosen")
    scored = attention if train_on_prompt else answer
    total, count = logps(model, ids, attention, scored)
    nll = -total.sum() / count.sum()

    def log_odds(average):
        return average - torch.log1p(-torch.exp(average))

    ratio = F.logsigmoid(log_odds(averages[0]) - log_odds(averages[1]))
    return (nll - beta * ratio.mean()).item()


def kto_by_hand(model, reference, batch, beta):
    """KTO (Ethayarajh et al. 2024, eq. 7, desirable and undesirable weights 1): with r = the answer's (policy
    - reference) log-prob and z = max(0, mean r over the batch's mismatched prompt/answer pairs), 1 -
    sigmoid(beta (r - z)) for a desirable answer and 1 - sigmoid(beta (z - r)) for an undesirable one, mean."""
    ids, attention, answer = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    policy, _ = logps(model, ids, attention, answer)
    base, _ = logps(reference, ids, attention, answer)
    mismatched = batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"]
    kl = (logps(model, *mismatched)[0] - logps(reference, *mismatched)[0]).mean().clamp(min=0)
    desirable = batch["label"].bool()
    r = policy - base
    assert r.abs().max() > 1e-3
    losses = torch.where(desirable, 1 - torch.sigmoid(beta * (r - kl)), 1 - torch.sigmoid(beta * (kl - r)))
    return losses.mean().item()


BY_HAND = {"dpo": dpo_by_hand, "simpo": simpo_by_hand, "orpo": orpo_by_hand, "kto": kto_by_hand}


@pytest.mark.parametrize("objective, config", [
    ("dpo", {}), ("simpo", {}), ("kto", {}), ("orpo", {}), ("orpo", {"train_on_prompt": True}),
], ids=["dpo", "simpo", "kto", "orpo", "orpo-train_on_prompt"])
def test_the_trainers_loss_is_the_papers_formula_over_the_answer_tokens(llama_base, monkeypatch, objective, config):
    seen = last_batch(llama_base, monkeypatch, objective, **config)
    assert seen["by_hand"] == pytest.approx(seen["loss"], rel=1e-5, abs=1e-6)
    if objective == "orpo":  # the prompt's tokens change the NLL term: the two readings are told apart
        assert abs(seen["other"] - seen["loss"]) > 0.05
