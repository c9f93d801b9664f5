"""Batched greedy generation and the exact-match metric.

Prompts are chat messages rendered with the tokenizer's chat template (plain strings become one user
turn), left-padded so that a whole batch generates at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from nbtune.errors import NbtuneError

Prompt = str | Sequence[dict[str, str]]


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) and "content" in m for m in prompt):
        return [dict(m) for m in prompt]
    raise NbtuneError(f"a prompt is a string or a list of chat messages ({{'role': 'user', 'content': ...}}), "
                      f"got {type(prompt).__name__} {str(prompt)[:60]!r}.")


def generate_texts(model: Any, tokenizer: Any, prompts: Sequence[Prompt], *, max_new_tokens: int = 128,
                   batch_size: int = 16, **generate_kwargs: Any) -> list[str]:
    """The model's answer to each prompt (greedy unless `do_sample=True` is passed)."""
    import torch

    texts = [tokenizer.apply_chat_template(as_messages(p), tokenize=False, add_generation_prompt=True)
             for p in prompts]
    generate_kwargs.setdefault("do_sample", False)
    answers: list[str] = []
    from nbtune.engine.precision import inference_precision

    with _eval_mode(model), _left_padding(tokenizer), torch.no_grad(), inference_precision(model):
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(_device(model))
            out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 use_cache=True, **generate_kwargs)
            new_tokens = out[:, batch["input_ids"].shape[1]:]
            answers += [a.strip() for a in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference after trimming whitespace."""
    if not references:
        return float("nan")
    hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True))
    return hits / len(references)


def _device(model: Any) -> Any:
    return next(model.parameters()).device


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _left_padding(tokenizer: Any) -> Iterator[None]:
    # Decoder-only models must be left-padded to generate a batch: new tokens follow the real text.
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = side
