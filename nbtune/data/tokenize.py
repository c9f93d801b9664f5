"""Tokenising examples for causal-LM training, with the loss on the answer tokens only by default.

Chat messages are rendered with the model's own chat template. The answer spans are found by rendering
the conversation up to each assistant turn, and tokens are labelled through the fast tokenizer's offset
mapping. We do this by hand because TRL's `assistant_only_loss` needs `{% generation %}` markers in the
template, which SmolLM2's (and most models') templates do not have.
"""

from __future__ import annotations

import warnings
from typing import Any

from nbtune.data.formats import to_messages
from nbtune.data.loading import quiet_datasets
from nbtune.errors import DataError, NbtuneWarning

IGNORE_INDEX = -100  # label value the loss skips (transformers' convention)

# For tokenizers without a chat template (GPT-2, base models): plain "Role: text" lines, with EOS after
# each answer so that generation knows where to stop.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}Assistant: {{ m['content'] }}{{ eos_token }}\n"
    "{% else %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Give the tokenizer a pad token and a chat template when it lacks them (in place; returns it)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return tokenizer


def render(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool = False) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as exc:  # e.g. Gemma's template: "System role not supported"
        raise DataError(f"the model's chat template refused a conversation: {exc}. Adjust the data (for "
                        "instance drop system messages) or use another model.", field="data") from None


def answer_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (end markers included)."""
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], generation_prompt=True) if i else None
        through = render(tokenizer, messages[: i + 1])
        # A conversation opening with the assistant has no "before"; the template may still put a default
        # system prompt first, which must not be trained on: fall back to finding the answer.
        if before is not None and through.startswith(before) and text.startswith(through):
            spans.append((len(before), len(through)))
        else:  # a template that rewrites earlier turns: fall back to finding the answer text
            start = text.find(message["content"], spans[-1][1] if spans else 0)
            if start >= 0:
                spans.append((start, start + len(message["content"])))
    return text, spans


def encode(example: dict[str, Any], *, tokenizer: Any, fmt: str, max_length: int,
           train_on_prompt: bool) -> dict[str, list[int]]:
    """input_ids, attention_mask, labels and length for one example."""
    if fmt == "text":
        if example.get("text") is None:
            raise DataError("a row of `data` has an empty `text`; fill or drop such rows.", field="data")
        enc = tokenizer(str(example["text"]) + tokenizer.eos_token, truncation=True, max_length=max_length)
        ids = enc["input_ids"]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids), "length": len(ids)}
    text, spans = answer_spans(tokenizer, to_messages(example, fmt))
    enc = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length,
                    return_offsets_mapping=not train_on_prompt)
    ids = enc["input_ids"]
    if train_on_prompt:
        labels = list(ids)
    else:
        labels = [tok if any(s <= start < e for s, e in spans) else IGNORE_INDEX
                  for tok, (start, _end) in zip(ids, enc["offset_mapping"], strict=True)]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "length": len(ids)}


_CACHE: dict[tuple[Any, ...], Any] = {}
_CACHE_SIZE = 8


def clear_cache() -> None:
    """Forget the tokenised datasets kept for re-runs of the same data (`nbtune.reclaim()` gives memory back)."""
    _CACHE.clear()


def tokenize_dataset(dataset: Any, tokenizer: Any, *, fmt: str, max_length: int, train_on_prompt: bool,
                     field: str = "data", cache_key: Any = None) -> Any:
    """The dataset tokenised, with a `length` column, and how many examples had no answer tokens left.

    Examples with no answer tokens (no assistant turn, or the answer wholly cut off by `max_length`) are
    dropped with a warning; an answer cut off partway trains on the part that fits.
    """
    if not tokenizer.is_fast and not train_on_prompt and fmt != "text":
        raise DataError("answer-only loss needs a fast (Rust) tokenizer; set `train_on_prompt: true` or use a "
                        "model with tokenizer.json.", field=field)
    # Re-running a notebook cell on the same data must not pay for tokenising it again: with a
    # `cache_key` (data named by a string), the result is kept per tokenizer and settings.
    key = None if cache_key is None else (cache_key, field, _tokenizer_identity(tokenizer), fmt, max_length,
                                          train_on_prompt)
    if key is not None and key in _CACHE:
        return _CACHE[key]
    with quiet_datasets():
        encoded = _tokenize(dataset, tokenizer, fmt=fmt, max_length=max_length, train_on_prompt=train_on_prompt,
                            field=field)
    if key is not None:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))  # the oldest entry
        _CACHE[key] = encoded
    return encoded


def _tokenizer_identity(tokenizer: Any) -> tuple[Any, ...]:
    return (tokenizer.name_or_path, len(tokenizer), tokenizer.chat_template, tokenizer.eos_token,
            tokenizer.pad_token)


def _tokenize(dataset: Any, tokenizer: Any, *, fmt: str, max_length: int, train_on_prompt: bool,
              field: str) -> Any:
    encoded = dataset.map(
        encode,
        fn_kwargs={"tokenizer": tokenizer, "fmt": fmt, "max_length": max_length,
                   "train_on_prompt": train_on_prompt},
        remove_columns=dataset.column_names,
        desc=f"tokenising {field}",
    )
    kept = encoded.filter(lambda ex: any(label != IGNORE_INDEX for label in ex["labels"]))
    if len(kept) == 0:
        raise DataError(
            f"no example of `{field}` has an answer left to learn: there is no assistant turn, or "
            f"max_length={max_length} cuts every answer off; raise `max_length` or check the data.",
            field="max_length",
        )
    if len(kept) < len(encoded):
        warnings.warn(f"{len(encoded) - len(kept)} of {len(encoded)} examples of `{field}` have no answer "
                      f"tokens (no assistant turn, or cut off by max_length={max_length}) and were dropped.",
                      NbtuneWarning, stacklevel=4)
    return kept


def prompts_and_answers(dataset: Any, fmt: str) -> list[tuple[list[dict[str, str]], str]]:
    """(messages before the last answer, the last answer) per example, for generation metrics."""
    pairs = []
    for example in dataset:
        if fmt == "unpaired" and example.get("label") is not True:
            continue  # an undesirable answer is no reference to score against
        messages = to_messages(example, fmt)
        if messages and messages[-1]["role"] == "assistant":
            pairs.append((messages[:-1], messages[-1]["content"]))
    return pairs
