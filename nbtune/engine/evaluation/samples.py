"""Answers to a few fixed prompts every `sample_every` steps while a run trains: watching the model learn.

    >>> run = nbtune.finetune(data="demo", sample_every=20, steps=60)     # doctest: +SKIP
    >>> run.samples[-1]                                                   # doctest: +SKIP
    {'step': 60, 'prompt': 'Convert to ISO 8601: 4 July 1976', 'answer': '1976-07-04'}

The prompts are `sample_prompts`, else the first 3 eval prompts. Answers are greedy and at most as long
as the longest eval answer the metrics score (in tokens) plus 4, as `run.evaluate` allows; 48 new tokens
when no eval answers are known. Sampling happens after every `sample_every`-th optimizer step and after
the last one, on the main process only, and leaves training as it found it: every module's train/eval
mode and torch's random number generators are restored, so a run with sampling trains bit-identically to
one without; its time is left out of the next step's tokens/s. Each time, the answers go to `run.samples`
and observers get `on_samples(run, step, records)` (engine/training/events.py).
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from nbtune.engine.evaluation.generation import Prompt, as_messages, generate_texts
from nbtune.engine.training.distributed import is_main_process
from nbtune.errors import ConfigError, NbtuneWarning

if TYPE_CHECKING:
    from nbtune.config import RunConfig
    from nbtune.engine.records.run import Run

DEFAULT_PROMPTS = 3  # eval prompts answered when `sample_prompts` is not set
UNKNOWN_LENGTH = 48  # new tokens per answer when no eval answer says how long answers are


# ---------------------------------------------------------------- before any weights load
def check_sample_prompts(config: RunConfig, evaluation: Any, fmt: str) -> None:
    """Refuse `sample_every` when there is nothing to answer: no `sample_prompts` and no eval row with an
    answer (`evaluation` and `fmt` as `read_data` returns them). Cheap: reads eval rows only until one fits."""
    if not config.sample_every or config.sample_prompts:
        return
    if evaluation is not None and fmt != "text" and _first_pairs(evaluation, fmt, 1):
        return
    where = "its eval rows have no answers" if evaluation is not None else "it has no eval data"
    raise ConfigError(f"`sample_every: {config.sample_every}` answers `sample_prompts` (default: the first "
                      f"{DEFAULT_PROMPTS} eval prompts), and this run has none ({where}): set sample_prompts: "
                      "['...'], or eval_data / eval_split.", field="sample_every")


def _first_pairs(dataset: Any, fmt: str, count: int) -> list[tuple[list[dict[str, str]], str]]:
    """`prompts_and_answers` of the first `count` rows that have an answer: a large eval set is not walked."""
    from nbtune.data import to_messages

    pairs = []
    for example in dataset:
        messages = to_messages(example, fmt)
        if messages and messages[-1]["role"] == "assistant":
            pairs.append((messages[:-1], messages[-1]["content"]))
            if len(pairs) >= count:
                break
    return pairs


# ---------------------------------------------------------------- what to answer, how long
def sample_prompts_for(config: RunConfig, eval_pairs: Sequence[tuple[Any, str]]) -> list[Prompt]:
    """`config.sample_prompts`, else the first 3 eval prompts (chat messages) of `eval_pairs`."""
    if config.sample_prompts:
        return list(config.sample_prompts)
    return [messages for messages, _ in eval_pairs[:DEFAULT_PROMPTS]]


def answer_budget(tokenizer: Any, eval_pairs: Sequence[tuple[Any, str]], scored: int) -> int:
    """max_new_tokens: the longest of the first `scored` eval answers in tokens + 4, else 48."""
    from nbtune.engine.evaluation.scoring import answer_budget as scoring_budget  # the same limit the metrics use

    answers = [answer for _, answer in eval_pairs[:scored]]
    return scoring_budget(tokenizer, answers) if answers else UNKNOWN_LENGTH


def record_prompt(prompt: Prompt) -> str | list[dict[str, str]]:
    """The prompt as `run.samples` keeps it: its text when it is one user turn, else its chat messages."""
    messages = as_messages(prompt)
    if len(messages) == 1 and messages[0].get("role", "user") == "user":
        return messages[0]["content"]
    return messages


# ---------------------------------------------------------------- answering mid-training
def sample_answers(run: Run, prompts: Sequence[Prompt], max_new_tokens: int, step: int) -> list[dict[str, Any]]:
    """{"step", "prompt", "answer"} per prompt, from `run.model` as it is now; training state untouched."""
    with training_untouched(run.model):
        answers = generate_texts(run.model, run.tokenizer, prompts, max_new_tokens=max_new_tokens)
    return [{"step": step, "prompt": record_prompt(p), "answer": a} for p, a in zip(prompts, answers, strict=True)]


@contextlib.contextmanager
def training_untouched(model: Any) -> Iterator[None]:
    """Inside: generate freely. After: each module's own train/eval flag as before (generate_texts restores
    only the top one's, recursively, which would wake a module a method keeps in eval mode) and torch's
    random number generators as before (greedy decoding draws none today; a run must not depend on that).

    NEFTune's noise and gradient checkpointing act in training mode only, so eval mode turns both off for
    the generation; no gradients are taken (no_grad), and the optimizer's state is not touched."""
    import torch

    modes = [(module, module.training) for module in model.modules()]
    device = next(model.parameters()).device
    on_cpu = device.type == "cpu"
    try:
        with torch.random.fork_rng(devices=[] if on_cpu else [device], device_type=None if on_cpu else device.type):
            yield
    finally:
        for module, training in modes:
            module.training = training  # the flag alone: `.train()` would set the children too


def _sharded_weights() -> bool:
    """FSDP or ZeRO-3 (as `accelerate launch` says): each process holds a shard of the weights, so the main
    process cannot generate alone."""
    env = os.environ
    fsdp = env.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    zero3 = env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true") and \
        env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    return fsdp or zero3


class SampleCallback(TrainerCallback):
    """Answers the run's sample prompts after every `every`-th optimizer step and the last one.

    `leave_out(seconds)` is told how long each sampling took, so that it is not counted as training time
    (RunCallback.leave_out). A sampling that fails warns once and sampling ends: a display aid must not
    end hours of training.
    """

    def __init__(self, run: Run, every: int, *, leave_out: Callable[[float], None] | None = None) -> None:
        self.run, self.every, self.leave_out = run, every, leave_out
        self.prompts: list[Prompt] = []
        self.max_new_tokens = UNKNOWN_LENGTH

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not is_main_process():
            return
        if _sharded_weights():
            warnings.warn(f"run {self.run.name!r}: `sample_every` is off under FSDP / ZeRO-3, where no process "
                          "holds the whole model to generate with.", NbtuneWarning, stacklevel=2)
            return
        config = self.run.config
        self.prompts = sample_prompts_for(config, self.run.eval_pairs)
        self.max_new_tokens = answer_budget(self.run.tokenizer, self.run.eval_pairs, config.metric_samples)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = state.global_step
        if not self._due(step, state.max_steps):
            return
        started = time.perf_counter()
        try:
            records = sample_answers(self.run, self.prompts, self.max_new_tokens, step)
        except Exception as exc:
            self.prompts = []
            warnings.warn(f"run {self.run.name!r}: sampling at step {step} failed, no more samples this run: "
                          f"{type(exc).__name__}: {exc}", NbtuneWarning, stacklevel=2)
            return
        finally:
            if self.leave_out is not None:
                self.leave_out(time.perf_counter() - started)
        self.run.samples.extend(records)
        self.run.emit("on_samples", step, records)

    def _due(self, step: int, last: int) -> bool:
        if not self.prompts or not (step % self.every == 0 or step >= last):
            return False
        # A run resumed at a step it had already sampled (stopped right after it) does not answer twice.
        return not any(r["step"] == step for r in self.run.samples[-len(self.prompts):])


__all__ = ["SampleCallback", "answer_budget", "check_sample_prompts", "record_prompt", "sample_answers",
           "sample_prompts_for", "training_untouched"]
