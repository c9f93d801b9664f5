"""The preview of a preference run shows the sequences its trainer trains on, token for token, with the
tokens its loss scores marked, and says in words what each objective's loss does with them."""

from __future__ import annotations

import pytest

import nbtune
from nbtune.config import RunConfig
from nbtune.data.demo import demo_pair_splits
from nbtune.data.preview import preview_batch
from nbtune.objectives import get_objective

CONFIG = {"steps": 1, "batch_size": 8, "metric": "none", "save": False, "max_length": 96, "eval_split": 0}


def trained_sequences(llama_base, monkeypatch, objective, rows, **config):
    """(ids, scored) of every real (non-padding) sequence in the first batch the trainer trained on."""
    trainer_class = get_objective(objective).trainer_class()
    batches = []
    real = trainer_class.compute_loss

    def watching(self, model, inputs, *args, **kwargs):
        batches.append(inputs)
        return real(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(trainer_class, "compute_loss", watching)
    nbtune.finetune(data=rows, base=llama_base, objective=objective, **{**CONFIG, **config})
    batch = batches[0]
    if "chosen_input_ids" in batch:  # ORPO / CPO: each side apart, the answer where the labels are
        sides = [(batch[f"{s}_input_ids"], batch[f"{s}_attention_mask"], batch[f"{s}_labels"] != -100)
                 for s in ("chosen", "rejected")]
    else:
        sides = [(batch["input_ids"], batch["attention_mask"], batch["completion_mask"].bool())]
    return [_real(ids.tolist(), mask.tolist(), scored.tolist()) for all_ids, masks, all_scored in sides
            for ids, mask, scored in zip(all_ids, masks, all_scored, strict=True)]


def _real(ids, mask, scored):
    return (tuple(i for i, m in zip(ids, mask, strict=True) if m),
            tuple(bool(s) for s, m in zip(scored, mask, strict=True) if m))


@pytest.mark.parametrize("objective", ["dpo", "orpo", "simpo", "kto"])
def test_the_preview_is_the_trainers_batch_token_for_token(llama_base, monkeypatch, objective):
    rows = demo_pair_splits()[0][:8]
    trained = trained_sequences(llama_base, monkeypatch, objective, rows)
    preview = preview_batch(RunConfig.parse(data=rows, objective=objective, **CONFIG), llama_base[1], n=8)
    shown = [_real(ex.token_ids, [not p for p in ex.padding], ex.loss) for ex in preview.examples]
    assert len(trained) == (8 if objective == "kto" else 16) and set(trained) <= set(shown)
    for ex in preview.examples:
        assert not any(ex.loss[: ex.length - ex.loss_tokens]) and ex.loss_tokens  # the answer only, all of it


def test_orpo_with_train_on_prompt_shows_the_chosen_chat_scored_whole(llama_base):
    rows = demo_pair_splits()[0][:2]
    preview = preview_batch(RunConfig.parse(data=rows, objective="orpo", train_on_prompt=True, **CONFIG),
                            llama_base[1], n=1)
    chosen, rejected = preview.examples
    assert chosen.loss_tokens == chosen.length and rejected.loss_tokens < rejected.length / 2
    assert "chosen chat's NLL over every token, prompt included" in str(preview)


@pytest.mark.parametrize("objective, says", [
    ("dpo", "summed log-prob over its [[...]] tokens with the reference's"),
    ("kto", "desirable (a pair's chosen) up, undesirable (its rejected) down"),
    ("simpo", "average log-prob per [[...]] token (chosen above rejected by a margin); no reference"),
    ("orpo", "the chosen answer's NLL (its [[...]] tokens) plus an odds-ratio term"),
])
def test_the_preview_says_what_each_objectives_loss_scores(llama_base, objective, says):
    preview = preview_batch(RunConfig.parse(data=demo_pair_splits()[0][:2], objective=objective), llama_base[1], n=1)
    text = str(preview)
    assert says in text.split("What is scored: ")[1].splitlines()[0]
    assert "the loss scores the answers only" not in text and "prompt included" not in text
