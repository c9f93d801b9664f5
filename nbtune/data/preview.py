"""What the model sees: the first training batch, token by token, before a single step trains.

    >>> import nbtune
    >>> nbtune.preview("data: demo", n=2)                        # doctest: +SKIP
    first training batch: 2 of its 8 examples (batch_size 8, seed 42) ...
    [1/2] row 113: 61 tokens, 12 carry loss, 0 padding
    <|im_start|>user
    Convert this date to ISO format (YYYY-MM-DD): 4 July 1976<|im_end|>
    <|im_start|>assistant
    [[1976-07-04<|im_end|>
    ]]

`preview_batch` does what training does, with the same functions: it reads the data (`read_data`),
tokenises it as the run's objective does (chat template, answer-only labels, `max_length`), orders it as
the Trainer deals it out (length-grouped, shuffled with `seed`: engine/training/sampling.py, which makes that order
depend on the seed alone, so it is reproduced exactly) and pads it with the training collator. A token
"carries loss" when its label is not -100: the model is trained to predict it. A template that puts the
answer's end marker outside the loss, or a `max_length` that cuts answers off, shows here first.

Only the tokenizer is needed (`nbtune.preview`, `%%finetune NAME --preview`, `nbtune preview` load no
weights). The engine's pieces are imported inside `_training_view`: the preview must not copy them.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from nbtune.config import RunConfig
from nbtune.config.objective import is_preference
from nbtune.data.formats import to_messages
from nbtune.data.splits import read_data
from nbtune.data.tokenize import IGNORE_INDEX, answer_spans, encode, prepare_tokenizer
from nbtune.errors import ConfigError

_NO_LIMIT = 1 << 30  # a max_length no text reaches: the length an example has before the cut


@dataclass
class ExamplePreview:
    """One example of the batch as the model gets it: one entry per token in each list, padding included."""

    position: int  # its place in the training order, from 0 (its batch is position // batch_size)
    row: int  # its row in the training data (after `eval_split` took the held-out rows)
    text: str  # the rendered text (chat template applied), before `max_length` cuts it
    token_ids: list[int]
    tokens: list[str]  # the tokenizer's own strings ('Ġ' is a space, 'Ċ' a newline in byte-level BPE)
    pieces: list[str]  # the text each token stands for
    loss: list[bool]  # its label is not -100: the loss trains the model to predict this token
    padding: list[bool]  # added by the collator to make the batch rectangular (attention mask 0)
    special: list[bool]  # a special token (<|im_start|>, EOS, ...)
    length: int  # tokens before padding
    full_length: int  # tokens it would have without `max_length`
    truncated: bool  # `max_length` cut it
    side: str = ""  # a preference pair's: chosen or rejected (desirable or undesirable for KTO's rows)

    @property
    def loss_tokens(self) -> int:
        return sum(self.loss)

    @property
    def padded(self) -> int:
        return sum(self.padding)


@dataclass
class BatchPreview:
    """The first `n` examples of training's first batch (or batches): `.examples`, one `ExamplePreview`
    each; `.df`, one row per token; printed, the text with the loss tokens in [[...]]; in a notebook, the
    tokens highlighted (static HTML, kept by a saved notebook)."""

    examples: list[ExamplePreview]
    model: str
    fmt: str
    batch_size: int
    max_length: int
    seed: int
    train_on_prompt: bool
    pad_token: str
    padding_side: str
    pad_to_multiple_of: int | None
    total: int  # training examples after tokenising
    dropped: int = 0  # examples training drops: no answer token left (see tokenize_dataset)
    objective: str = "sft"  # a preference objective shows pairs, each as its two sequences (preview_pairs.py)

    @property
    def df(self) -> Any:
        """A pandas DataFrame, one row per token (padding included): example (its place in the training
        order), row (in the data), pos, token_id, token, text, loss, padding, special. Per-example numbers
        are in `.examples` (length, loss_tokens, padded, truncated)."""
        import pandas as pd

        rows = [{"example": ex.position, "row": ex.row, "pos": i, "token_id": tid, "token": tok, "text": piece,
                 "loss": loss, "padding": pad, "special": special}
                for ex in self.examples
                for i, (tid, tok, piece, loss, pad, special) in enumerate(zip(
                    ex.token_ids, ex.tokens, ex.pieces, ex.loss, ex.padding, ex.special, strict=True))]
        return pd.DataFrame(rows, columns=["example", "row", "pos", "token_id", "token", "text", "loss", "padding",
                                           "special"])

    def header(self) -> str:
        """What is shown and how it was made, in a sentence or three."""
        if self.objective != "sft":
            from nbtune.data.preview_pairs import pairs_header

            return pairs_header(self)
        n, size = len(self.examples), self.batch_size
        batches = math.ceil(n / size) if n else 0
        what = (f"first training batch: {n} of its {min(size, self.total)} examples" if batches <= 1 else
                f"first {batches} training batches: {n} examples, {size} per batch")
        loss = ("every token (plain text rows)" if self.fmt == "text" else
                "every token (`train_on_prompt`)" if self.train_on_prompt else "the answers only")
        multiple = f", a multiple of {self.pad_to_multiple_of}" if self.pad_to_multiple_of else ""
        lines = [f"{what} (batch_size {size}, seed {self.seed}); model {self.model}, format {self.fmt}, "
                 f"max_length {self.max_length}, loss on {loss}.",
                 f"Order: the Trainer's own (length-grouped, shuffled with seed {self.seed}), reproduced exactly. "
                 f"Padding: the training collator's, to the batch's longest{multiple}, on the {self.padding_side} "
                 f"with {self.pad_token!r}."]
        if self.dropped:
            lines.append(f"{self.dropped} example(s) have no answer token left and are not trained on.")
        return "\n".join(lines)

    def __str__(self) -> str:
        legend = ("[[...]] carries loss (the model learns to predict it)." if self.objective == "sft" else
                  "[[...]] carries loss: the loss reads the model's log-prob of these tokens (what it does "
                  "with them: above).")
        parts = [self.header(), legend]
        count = len({ex.position for ex in self.examples})  # a preference pair is two sequences at one place
        parts += [example_text(ex, count, self) for ex in self.examples]
        return "\n\n".join(parts)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        from nbtune.widgets.preview_view import preview_html  # the data layer stays free of display code

        return preview_html(self)


def example_text(ex: ExamplePreview, count: int, preview: BatchPreview) -> str:
    """One example as plain text: a summary line, then its tokens with the loss-carrying runs in [[...]]."""
    out, inside = [], False
    for piece, loss, pad in zip(ex.pieces, ex.loss, ex.padding, strict=True):
        if pad:
            continue
        if loss != inside:
            out.append("[[" if loss else "]]")
            inside = loss
        out.append(piece)
    if inside:
        out.append("]]")
    side = f" ({ex.side})" if ex.side else ""
    lines = [f"[{ex.position + 1}/{count}] row {ex.row}{side}: {ex.length} tokens, {ex.loss_tokens} carry loss, "
             f"{ex.padded} padding" + (" - TRUNCATED" if ex.truncated else ""), "".join(out)]
    if ex.padded:
        lines.append(f"  + {ex.padded} x {preview.pad_token!r} padding on the {preview.padding_side} (no loss, "
                     "not attended)")
    if ex.truncated:
        lines.append(f"  TRUNCATED: max_length {preview.max_length} keeps {ex.length} of its {ex.full_length} "
                     "tokens")
    return "\n".join(lines)


def check_count(n: Any) -> int:
    """`n`, the number of examples to show, refused unless it is a whole number >= 1."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ConfigError(f"`n` is the number of examples to show: a whole number, 1 or more (got {n!r}).",
                          field="n")
    return int(n)


def preview_batch(config: RunConfig, tokenizer: Any, n: int = 4, *, records: tuple[Any, str] | None = None
                  ) -> BatchPreview:
    """The first `n` examples in the order training sees them, encoded, ordered and padded as training does.

    `tokenizer` is the model's (prepared in place with `prepare_tokenizer`, as training prepares it);
    `records`: `(train, format)` that `read_data(config)` gave already, so as not to read the data twice.

        >>> from nbtune.engine.bases.loading import load_tokenizer                       # doctest: +SKIP
        >>> config = RunConfig.parse({"data": "demo", "max_length": 32})          # doctest: +SKIP
        >>> batch = preview_batch(config, load_tokenizer(config.model), n=2)      # doctest: +SKIP
        >>> [ex.truncated for ex in batch.examples], batch.df.loss.sum()          # doctest: +SKIP
    """
    n = check_count(n)
    if records is None:
        train, _, fmt = read_data(config)
    else:
        train, fmt = records
    tokenizer = prepare_tokenizer(tokenizer)
    if is_preference(config):
        from nbtune.data.preview_pairs import preview_pairs

        return preview_pairs(config, tokenizer, n, train, fmt)
    train_set, order, collate, policy = _training_view(config, train, fmt, tokenizer)
    rows = _source_rows(train, train_set, tokenizer, fmt, config)
    shown = order[:n]
    examples = []
    for first in range(0, len(shown), config.batch_size):  # each shown example padded within its whole batch
        members = order[first:first + config.batch_size]
        batch = collate([train_set[i] for i in members])
        for j, index in enumerate(members[:len(shown) - first]):
            examples.append(_example(first + j, rows[index], train[rows[index]], batch, j, tokenizer, fmt, config))
    return BatchPreview(
        examples=examples, model=config.model, fmt=fmt, batch_size=config.batch_size, max_length=config.max_length,
        seed=config.seed, train_on_prompt=config.train_on_prompt, pad_token=str(tokenizer.pad_token),
        padding_side=tokenizer.padding_side, pad_to_multiple_of=policy.pad_to_multiple_of, total=len(train_set),
        dropped=len(train) - len(train_set))


def _training_view(config: RunConfig, train: Any, fmt: str, tokenizer: Any) -> tuple[Any, list[int], Any, Any]:
    """(tokenised train set, the Trainer's order of it, the training collator, the device policy), each from
    the function training itself calls."""
    from nbtune.engine.compute import device
    from nbtune.engine.training.sampling import EpochSeededLengthGroupedSampler
    from nbtune.engine.training.trainer import make_collator
    from nbtune.objectives.registry import objective_for

    train_set, _ = objective_for(config).tokenize(train, None, fmt, tokenizer, config)  # its cache, warmed
    # DataOrder (engine/training/sampling.py) groups over the global batch, train_batch_size x grad_accum x processes,
    # and draws epoch 0 from the seed alone; tests/test_preview.py checks this against a real Trainer.
    group = config.batch_size * config.grad_accum * config.num_processes
    order = list(EpochSeededLengthGroupedSampler(group, train_set["length"], config.seed))
    policy = device.current()
    return train_set, order, make_collator(tokenizer, policy), policy


def _source_rows(train: Any, train_set: Any, tokenizer: Any, fmt: str, config: RunConfig) -> list[int]:
    """For each tokenised example, its row in `train`: the same unless rows without an answer were dropped."""
    if len(train_set) == len(train):
        return list(range(len(train)))
    settings = dict(tokenizer=tokenizer, fmt=fmt, max_length=config.max_length,
                    train_on_prompt=config.train_on_prompt)
    return [i for i, record in enumerate(train)  # as tokenize_dataset filters: some label left
            if any(label != IGNORE_INDEX for label in encode(record, **settings)["labels"])]


def _example(position: int, row: int, record: dict[str, Any], batch: Any, j: int, tokenizer: Any, fmt: str,
             config: RunConfig) -> ExamplePreview:
    ids = batch["input_ids"][j].tolist()
    padding = [mask == 0 for mask in batch["attention_mask"][j].tolist()]
    loss = [label != IGNORE_INDEX for label in batch["labels"][j].tolist()]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    specials = special_ids(tokenizer)
    special = [tid in specials for tid in ids]
    length = len(ids) - sum(padding)
    full = encode(record, tokenizer=tokenizer, fmt=fmt, max_length=_NO_LIMIT, train_on_prompt=True)["length"]
    return ExamplePreview(position=position, row=row, text=rendered_text(record, tokenizer, fmt), token_ids=ids,
                          tokens=tokens, pieces=readable_pieces(tokenizer, tokens, special), loss=loss,
                          padding=padding, special=special, length=length, full_length=full,
                          truncated=full > length)


def rendered_text(record: dict[str, Any], tokenizer: Any, fmt: str) -> str:
    """The text training tokenises for `record`: the chat template's rendering (text rows: text + EOS)."""
    if fmt == "text":
        return str(record["text"]) + tokenizer.eos_token
    return answer_spans(tokenizer, to_messages(record, fmt))[0]


def special_ids(tokenizer: Any) -> set[int]:
    """The ids of the tokenizer's special tokens, those added as special but given no role included."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, token in added.items() if getattr(token, "special", False)}


def readable_pieces(tokenizer: Any, tokens: list[str], special: list[bool]) -> list[str]:
    """The text each token stands for: byte-level BPE's 'Ġ' and 'Ċ' back to a space and a newline, a
    character split over several tokens as '�' in each; SentencePiece's '▁' as a space."""
    byte_level = _is_byte_level(tokenizer)
    return [token if is_special else _byte_text(token) if byte_level else _sentencepiece_text(token)
            for token, is_special in zip(tokens, special, strict=True)]


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and b'"ByteLevel"' in decoder.__getstate__()


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed (its `bytes_to_unicode`): the byte each character stands for.
    Printable Latin-1 bytes stand for themselves; the others were moved to U+0100 onwards ('Ġ' is 0x20)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet, moved = {chr(b): b for b in kept}, 0
    for b in range(256):
        if b not in kept:
            alphabet[chr(256 + moved)] = b
            moved += 1
    return alphabet


_BYTES = _byte_alphabet()


def _byte_text(token: str) -> str:
    if not all(char in _BYTES for char in token):  # an added token that is plain text
        return token
    return bytes(_BYTES[char] for char in token).decode("utf-8", errors="replace")


def _sentencepiece_text(token: str) -> str:
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):  # byte fallback, e.g. <0x0A>
        value = int(token[3:5], 16)
        return chr(value) if value < 0x80 else "�"
    return token.replace("▁", " ")


__all__ = ["BatchPreview", "ExamplePreview", "check_count", "preview_batch", "readable_pieces", "rendered_text",
           "special_ids"]
