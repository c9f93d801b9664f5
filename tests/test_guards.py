"""NaN/inf never reaches the weights; interrupts keep state (issue 8, items 3 and 4)."""

from __future__ import annotations

import pytest
import torch
from conftest import InterruptAt, finetune_interrupted, tiny_llama

import nbtune

SETTINGS = {"steps": 6, "batch_size": 4, "lr": 1e-2, "metric": "none", "save": False, "precision": "fp32"}


class PoisonStep:
    """Makes the training forward of the given optimizer steps return NaN logits."""

    def __init__(self, model, steps):
        self.steps, self.forward_count = set(steps), 0
        model.register_forward_hook(self.hook)

    def hook(self, module, args, output):
        if not module.training:
            return output
        self.forward_count += 1
        if self.forward_count in self.steps:
            output.logits = output.logits * float("nan")
        return output


class Snapshots:
    def __init__(self):
        self.weights = {}

    def on_step(self, run, record):
        self.weights[record["step"]] = {n: p.detach().clone() for n, p in run.model.named_parameters()
                                        if p.requires_grad}


def test_a_nan_loss_stops_the_run_with_the_last_good_weights(chat_tokenizer, demo_rows):
    model = tiny_llama(chat_tokenizer)
    PoisonStep(model, [3])
    snapshots = Snapshots()
    with pytest.warns(UserWarning, match="diverged"):
        run = nbtune.finetune(data=demo_rows, base=(model, chat_tokenizer), observers=[snapshots], **SETTINGS)
    assert run.status == "failed" and "step 3" in run.error and "lr" in run.error
    assert [r["step"] for r in run.history] == [1, 2, 3]  # ended within one step
    assert torch.isnan(torch.tensor(run.history[-1]["loss"]))  # the log tells the truth
    for name, param in run.model.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, snapshots.weights[2][name]), name  # step 3 changed nothing
    assert run.generate("hello", max_new_tokens=2) is not None  # the model is usable


def test_skip_drops_bad_batches_and_goes_on(chat_tokenizer, demo_rows):
    model = tiny_llama(chat_tokenizer)
    PoisonStep(model, [2, 4])
    run = nbtune.finetune(data=demo_rows, base=(model, chat_tokenizer), on_nonfinite="skip", **SETTINGS)
    assert run.status == "finished" and run.metrics["skipped_steps"] == [2, 4]
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


def test_skip_still_stops_when_every_step_is_bad(chat_tokenizer, demo_rows):
    model = tiny_llama(chat_tokenizer)
    PoisonStep(model, range(1, 100))
    with pytest.warns(UserWarning, match="10 steps in a row"):
        run = nbtune.finetune(data=demo_rows, base=(model, chat_tokenizer), on_nonfinite="skip",
                              **{**SETTINGS, "steps": 30})
    assert run.status == "failed" and len(run.history) == 10


def test_the_optimizer_gets_its_own_step_back(chat_tokenizer, demo_rows, monkeypatch):
    from nbtune.engine.training import guards

    made, install = [], guards.NonFiniteGuard.on_train_begin
    monkeypatch.setattr(guards.NonFiniteGuard, "on_train_begin",
                        lambda self, *args, **kwargs: (made.append(self), install(self, *args, **kwargs))[1])
    nbtune.finetune(data=demo_rows, base=(tiny_llama(chat_tokenizer), chat_tokenizer), **SETTINGS)
    assert made and all(guard._restore is None for guard in made)


@pytest.mark.parametrize("at", [1, 3, 5])
def test_a_keyboard_interrupt_stops_keeps_state_and_resumes_exactly(chat_tokenizer, demo_rows, at):
    whole = nbtune.finetune(data=demo_rows, base=(tiny_llama(chat_tokenizer), chat_tokenizer), **SETTINGS)
    part = finetune_interrupted(data=demo_rows, base=(tiny_llama(chat_tokenizer), chat_tokenizer),
                                observers=[InterruptAt(at)], **SETTINGS)
    assert part.status == "stopped" and len(part.history) == at and part.checkpoint
    part.resume()
    assert [r["loss"] for r in part.history] == [r["loss"] for r in whole.history]
    for (name, a), b in zip(part.model.named_parameters(), whole.model.parameters(), strict=True):
        assert torch.equal(a, b), name
