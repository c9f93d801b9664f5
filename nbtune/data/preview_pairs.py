"""What a preference run's model sees: each pair as the two sequences TRL's trainer builds from it.

The prompt is rendered with the chat template and a generation prompt, each answer after it; the answer
starts where the tokenised prompt and prompt + answer part (TRL's `common_prefix_length`), and TRL's own
collator (`DataCollatorForPreference`) pads the pair and marks the answer tokens, which are the tokens the
preference loss scores ("carry loss" in the preview). Rows of KTO data show one sequence each, desirable or
not. The first `n` rows of the training data are shown in their order in the data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nbtune.data.preference import preference_rows

if TYPE_CHECKING:
    from nbtune.config import RunConfig
    from nbtune.data.preview import BatchPreview, ExamplePreview


def preview_pairs(config: RunConfig, tokenizer: Any, n: int, train: Any, fmt: str) -> BatchPreview:
    from nbtune.data.preview import BatchPreview

    rows = preference_rows(train.select(range(min(n, len(train)))), fmt, tokenizer=tokenizer)
    examples = []
    for position, row in enumerate(rows):
        sides = (("chosen", row["chosen"]), ("rejected", row["rejected"])) if "chosen" in row else (
            ("desirable" if row["label"] else "undesirable", row["completion"]),)
        examples += _sequences(position, row["prompt"], sides, tokenizer, config.max_length)
    return BatchPreview(examples=examples, model=config.model, fmt=fmt, batch_size=config.batch_size,
                        max_length=config.max_length, seed=config.seed, train_on_prompt=False,
                        pad_token=str(tokenizer.pad_token), padding_side="right", pad_to_multiple_of=None,
                        total=len(train), objective=config.objective)


def _sequences(position: int, prompt: list[dict], sides: tuple, tokenizer: Any, max_length: int
               ) -> list[ExamplePreview]:
    from trl.data_utils import common_prefix_length
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from nbtune.data.preview import ExamplePreview, readable_pieces, special_ids

    def ids(messages: list[dict], **kwargs: Any) -> list[int]:
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]

    prompt_ids = ids(prompt, add_generation_prompt=True)
    full = [ids(prompt + answer) for _, answer in sides]
    start = min(common_prefix_length(prompt_ids, f) for f in full)
    answers = [f[start:] for f in full]
    example = {"prompt_ids": prompt_ids[:start], "chosen_ids": answers[0], "rejected_ids": answers[-1]}
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=max_length)([example])
    specials = special_ids(tokenizer)
    out = []
    for j, ((side, _), whole) in enumerate(zip(sides, full, strict=True)):
        token_ids = batch["input_ids"][j].tolist()
        padding = [m == 0 for m in batch["attention_mask"][j].tolist()]
        tokens = tokenizer.convert_ids_to_tokens(token_ids)
        special = [t in specials for t in token_ids]
        length = len(token_ids) - sum(padding)
        out.append(ExamplePreview(
            position=position, row=position, text=tokenizer.decode(whole), token_ids=token_ids, tokens=tokens,
            pieces=readable_pieces(tokenizer, tokens, special), loss=[bool(m) for m in batch["completion_mask"][j]],
            padding=padding, special=special, length=length, full_length=len(whole), truncated=len(whole) > length,
            side=side))
    return out


def pairs_header(preview: BatchPreview) -> str:
    pairs = len({ex.position for ex in preview.examples})
    kind = "rows" if preview.examples and preview.examples[0].side in ("desirable", "undesirable") else "pairs"
    return "\n".join([
        f"first {pairs} preference {kind} of the training data ({preview.objective}; model {preview.model}, "
        f"max_length {preview.max_length}); the loss scores the answers only.",
        f"Each {kind[:-1]} as TRL's trainer builds it: the chat-templated prompt, then the answer (the collator "
        f"pads the shorter of a pair with {preview.pad_token!r} on the right). Shown in the data's order; training "
        f"draws them in an order shuffled with seed {preview.seed}."])


__all__ = ["pairs_header", "preview_pairs"]
