"""Batched greedy generation and the exact-match metric.

Prompts are chat messages rendered with the tokenizer's chat template (plain strings become one user
turn), left-padded so that a whole batch generates at once.
"""

from __future__ import annotations

import ast
import contextlib
import numbers
import re
from collections.abc import Iterator, Sequence
from typing import Any

from nbtune.errors import NbtuneError, did_you_mean

Prompt = str | Sequence[dict[str, str]]


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) and "content" in m for m in prompt):
        return [dict(m) for m in prompt]
    raise NbtuneError(f"a prompt is a string or a list of chat messages ({{'role': 'user', 'content': ...}}), "
                      f"got {type(prompt).__name__} {str(prompt)[:60]!r}.")


def check_count(name: str, value: Any, example: int) -> None:
    """Raise `NbtuneError` unless `value` is an integer of 1 or more (`name` is the keyword it came in)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise NbtuneError(f"`{name}` is {value!r}; it takes a whole number of 1 or more, e.g. {name}={example}.",
                          field=name)


def _check_generate_kwargs(generate_kwargs: dict[str, Any]) -> None:
    for ours in ("input_ids", "attention_mask", "inputs"):
        if ours in generate_kwargs:
            raise NbtuneError(f"`{ours}` is made from the prompts; pass the prompt text (or chat messages) "
                              "instead.", field=ours)
    if "num_beams" in generate_kwargs:
        check_count("num_beams", generate_kwargs["num_beams"], 4)  # 0 ends in a ZeroDivisionError
    if generate_kwargs.get("num_return_sequences", 1) != 1:
        raise NbtuneError("`num_return_sequences` must be 1: generate returns one answer per prompt; repeat "
                          "the prompt in the list (with do_sample=True) for several answers.",
                          field="num_return_sequences")


def generate_texts(model: Any, tokenizer: Any, prompts: Sequence[Prompt], *, max_new_tokens: int = 128,
                   batch_size: int = 16, **generate_kwargs: Any) -> list[str]:
    """The model's answer to each prompt (greedy unless `do_sample=True` is passed)."""
    import torch

    check_count("max_new_tokens", max_new_tokens, 32)
    check_count("batch_size", batch_size, 16)
    _check_generate_kwargs(generate_kwargs)
    texts = [tokenizer.apply_chat_template(as_messages(p), tokenize=False, add_generation_prompt=True)
             for p in prompts]
    # The caller's keywords win over these defaults (passing one of them twice would be a TypeError).
    options = {"do_sample": False, "pad_token_id": tokenizer.pad_token_id, "use_cache": True, **generate_kwargs}
    if "stop_strings" in options:
        options.setdefault("tokenizer", tokenizer)  # transformers needs it to find the strings in tokens
    answers: list[str] = []
    from nbtune.engine.compute.precision import inference_precision

    with eval_mode(model), _left_padding(tokenizer), torch.no_grad(), inference_precision(model):
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(_device(model))
            try:
                out = model.generate(**batch, max_new_tokens=max_new_tokens, **options)
            except ValueError as exc:
                if not generate_kwargs:  # not a keyword the user passed: not theirs to fix
                    raise
                raise _keyword_error(exc, generate_kwargs) from None
            new_tokens = out[:, batch["input_ids"].shape[1]:]
            answers += [a.strip() for a in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


def _keyword_error(exc: ValueError, generate_kwargs: dict[str, Any]) -> NbtuneError:
    """transformers' refusal of a generate keyword as one line: unknown names get a did-you-mean."""
    message = str(exc)
    unknown = re.search(r"not used by the model: (\[.*?\])", message)
    if unknown:  # transformers' check of keywords it does not know (typos included)
        names = [n for n in ast.literal_eval(unknown.group(1)) if n in generate_kwargs] or list(generate_kwargs)
        hint = did_you_mean(names[0], _generate_keywords())
        if "max_new_tokens" not in hint:
            hint += " The answer length is `max_new_tokens` (e.g. max_new_tokens=32)."
        return NbtuneError(f"generate has no keyword {', '.join(f'`{n}`' for n in names)}.{hint}", field=names[0])
    first = message.strip().splitlines()[0] if message.strip() else type(exc).__name__
    passed = ", ".join(f"{k}={v!r}" for k, v in generate_kwargs.items())
    return NbtuneError(f"generate refused {passed}: {first}", field=next(iter(generate_kwargs)))


def _generate_keywords() -> list[str]:
    import inspect

    from transformers import GenerationConfig, GenerationMixin

    names = set(GenerationConfig().to_dict()) | set(inspect.signature(GenerationMixin.generate).parameters)
    return sorted(names - {"self", "kwargs", "inputs"})


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference after trimming whitespace."""
    if not references:
        return float("nan")
    hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True))
    return hits / len(references)


def _device(model: Any) -> Any:
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
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
