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

`preview_batch` reads the data (`read_data`) and asks the run's objective for its preview (its
`ObjectiveSpec.preview`, nbtune/objectives): the first examples as its Trainer builds them, with the same
functions training calls. For `sft` that is the Trainer's first batch exactly: tokenised as training
tokenises it (chat template, answer-only labels, `max_length`), in the Trainer's order, padded with the
training collator (objectives/sft.py); a preference objective shows each pair as TRL builds it
(objectives/pair_preview.py). A token "carries loss" when the objective's loss reads it (for sft: its label
is not -100, the model is trained to predict it). A template that puts the answer's end marker outside the
loss, or a `max_length` that cuts answers off, shows here first.

This module holds what a preview is (`BatchPreview`, `ExamplePreview`) and its text; the objective builds it
and says what it shows (`preview_header`). Only the tokenizer is needed (`nbtune.preview`,
`%%finetune NAME --preview`, `nbtune preview` load no weights).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nbtune.data.formats import to_messages
from nbtune.data.splits import read_data
from nbtune.data.tokenize import answer_spans, prepare_tokenizer
from nbtune.errors import ConfigError

if TYPE_CHECKING:
    from nbtune.config import RunConfig


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
    objective: str = "sft"  # whose preview: it says what is shown (`preview_header`) and what [[...]] means

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
        """What is shown and how it was made, in a sentence or three, as the objective says it."""
        from nbtune.objectives.registry import get_objective

        return get_objective(self.objective).preview_header(self)

    def __str__(self) -> str:
        from nbtune.objectives.registry import get_objective

        parts = [self.header(), get_objective(self.objective).legend]
        count = len({ex.position for ex in self.examples})  # a preference pair is two sequences at one place
        parts += [example_text(ex, count, self) for ex in self.examples]
        return "\n\n".join(parts)

    __repr__ = __str__



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
    """The first `n` examples as the objective's Trainer gets them (for sft: in the order training sees them,
    encoded, ordered and padded as training does).

    `tokenizer` is the model's (prepared in place with `prepare_tokenizer`, as training prepares it);
    `records`: `(train, format)` that `read_data(config)` gave already, so as not to read the data twice.

        >>> from nbtune.engine.bases.loading import load_tokenizer                       # doctest: +SKIP
        >>> config = RunConfig.parse({"data": "demo", "max_length": 32})          # doctest: +SKIP
        >>> batch = preview_batch(config, load_tokenizer(config.model), n=2)      # doctest: +SKIP
        >>> [ex.truncated for ex in batch.examples], batch.df.loss.sum()          # doctest: +SKIP
    """
    from nbtune.objectives.registry import get_objective

    n = check_count(n)
    if records is None:
        train, _, fmt = read_data(config)
    else:
        train, fmt = records
    tokenizer = prepare_tokenizer(tokenizer)
    return get_objective(config.objective).preview(config, tokenizer, n, train, fmt)


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
