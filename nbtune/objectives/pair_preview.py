"""What a preference run's model sees: each pair as the two sequences TRL's trainer builds from it, and what
the objective's loss scores in them (the preview hooks of `TrlPairs`, objectives/trl_pairs.py).

DPO and KTO: the prompt is rendered with the chat template and a generation prompt, each answer after it; the
answer starts where the tokenised prompt and prompt + answer part (TRL's `common_prefix_length`), and TRL's own
collator (`DataCollatorForPreference`) pads the pair and marks the answer tokens. ORPO and SimPO (TRL's ORPO
and CPO trainers, `TrlPairs.pair_forward`) tokenise in their own way, with their trainer's `tokenize_row` (which
appends the EOS token where the template's turn does not end on it) and pad with `concatenated_inputs`; the
preview calls those same functions. Rows of KTO data show one sequence each, desirable or not. The first `n`
rows of the training data are shown in their order in the data.

A token "carries loss" ([[...]]) when the objective's loss reads the model's log-prob of it: the answer tokens
of both sides for every objective (ORPO: with `train_on_prompt`, the chosen side's prompt tokens too, for its
NLL term). What the loss does with them differs, and the header says it (each objective's `scores`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nbtune.config import RunConfig
    from nbtune.data.preview import BatchPreview, ExamplePreview
    from nbtune.objectives.trl_pairs import TrlPairs

_NO_LIMIT = 1 << 30  # a max_length no pair reaches: its length before the cut
PAIRS_LEGEND = ("[[...]] carries loss: the loss reads the model's log-prob of these tokens (what it does with them: "
                "above).")


def preview_pairs(trl: TrlPairs, config: RunConfig, tokenizer: Any, n: int, train: Any, fmt: str) -> BatchPreview:
    from nbtune.data.preference import preference_rows
    from nbtune.data.preview import BatchPreview

    rows = preference_rows(train.select(range(min(n, len(train)))), fmt, tokenizer=tokenizer)
    examples = []
    for position, row in enumerate(rows):
        sides = (("chosen", row["chosen"]), ("rejected", row["rejected"])) if "chosen" in row else (
            ("desirable" if row["label"] else "undesirable", row["completion"]),)
        examples += _sequences(trl, position, row, sides, tokenizer, config)
    return BatchPreview(examples=examples, model=config.model, fmt=fmt, batch_size=config.batch_size,
                        max_length=config.max_length, seed=config.seed, train_on_prompt=config.train_on_prompt,
                        pad_token=str(tokenizer.pad_token), padding_side="right", pad_to_multiple_of=None,
                        total=len(train), objective=config.objective)


def _sequences(trl: TrlPairs, position: int, row: dict[str, Any], sides: tuple, tokenizer: Any, config: RunConfig
               ) -> list[ExamplePreview]:
    from nbtune.data.preview import ExamplePreview, readable_pieces, special_ids

    if trl.pair_forward:
        built = _orpo_cpo_pair(trl, row, tokenizer, config)
    else:
        built = _dpo_pair(row["prompt"], sides, tokenizer, config.max_length)
    specials = special_ids(tokenizer)
    out = []
    for (side, _), (token_ids, attention, loss, full) in zip(sides, built, strict=False):
        padding = [m == 0 for m in attention]
        tokens = tokenizer.convert_ids_to_tokens(token_ids)
        special = [t in specials for t in token_ids]
        length = len(token_ids) - sum(padding)
        out.append(ExamplePreview(
            position=position, row=position, text=tokenizer.decode(full), token_ids=token_ids, tokens=tokens,
            pieces=readable_pieces(tokenizer, tokens, special), loss=loss, padding=padding, special=special,
            length=length, full_length=len(full), truncated=len(full) > length, side=side))
    return out


def _dpo_pair(prompt: list[dict], sides: tuple, tokenizer: Any, max_length: int) -> list[tuple]:
    """DPO's and KTO's sequences: (token ids, attention mask, loss mask, ids before `max_length`) per side."""
    from trl.data_utils import common_prefix_length
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    def ids(messages: list[dict], **kwargs: Any) -> list[int]:
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]

    prompt_ids = ids(prompt, add_generation_prompt=True)
    full = [ids(prompt + answer) for _, answer in sides]
    start = min(common_prefix_length(prompt_ids, f) for f in full)
    answers = [f[start:] for f in full]
    example = {"prompt_ids": prompt_ids[:start], "chosen_ids": answers[0], "rejected_ids": answers[-1]}
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=max_length)([example])
    return [(batch["input_ids"][j].tolist(), batch["attention_mask"][j].tolist(),
             [bool(m) for m in batch["completion_mask"][j]], whole) for j, whole in enumerate(full)]


def _orpo_cpo_pair(trl: TrlPairs, row: dict[str, Any], tokenizer: Any, config: RunConfig) -> list[tuple]:
    """ORPO's and SimPO's sequences, from the functions their trainer calls: TRL's `maybe_apply_chat_template`,
    the trainer's `tokenize_row` and `concatenated_inputs` (which pads the shorter side to the longer)."""
    from trl.data_utils import maybe_apply_chat_template
    from trl.experimental.utils import DPODataCollatorWithPadding

    trainer_class = trl.trainer_class()
    text = maybe_apply_chat_template({k: row[k] for k in ("prompt", "chosen", "rejected")}, tokenizer)

    def tokenized(max_length: int) -> dict[str, Any]:
        # `tokenize_row` reads the tokenizer and max_length off its trainer; a whole trainer needs a model, so
        # it runs on an instance that has only those (its __init__, which would load the data, never runs).
        tokenizing = object.__new__(trainer_class)
        tokenizing.processing_class, tokenizing.is_encoder_decoder = tokenizer, False
        tokenizing.max_length, tokenizing.padding_value = max_length, tokenizer.pad_token_id
        return tokenizing.tokenize_row(text)

    features = tokenized(config.max_length)
    batch = DPODataCollatorWithPadding(pad_token_id=tokenizer.pad_token_id)([features])
    pair = trainer_class.concatenated_inputs(batch, padding_value=tokenizer.pad_token_id)
    untruncated = tokenized(_NO_LIMIT)
    out = []
    for j, side in enumerate(("chosen", "rejected")):
        attention = pair["concatenated_attention_mask"][j].tolist()
        # `train_on_prompt` reaches here only for an objective that takes it (ORPO: its NLL term over the whole
        # chosen chat); the config refused it for the others.
        scored = (attention if side == "chosen" and config.train_on_prompt
                  else [label != -100 for label in pair["concatenated_labels"][j].tolist()])
        out.append((pair["concatenated_input_ids"][j].tolist(), attention, [bool(s) for s in scored],
                    untruncated[f"{side}_input_ids"]))
    return out


def pairs_header(preview: BatchPreview, *, appends_eos: bool) -> str:
    """What the preview shows: the pairs (or KTO's rows), what the objective's loss scores in them, and how
    TRL's trainer builds each (`appends_eos`: TRL's ORPO and CPO trainers end each answer on the EOS token)."""
    from nbtune.objectives.registry import get_objective

    pairs = len({ex.position for ex in preview.examples})
    kind = "rows" if preview.examples and preview.examples[0].side in ("desirable", "undesirable") else "pairs"
    eos = (", ending on the EOS token, which TRL's ORPO and CPO trainers append where the template's turn ends "
           "otherwise" if appends_eos else "")
    padded = "the pair is padded to its longer side" if kind == "pairs" else "the batch is padded"
    scored = get_objective(preview.objective).scores(preview.train_on_prompt, preview.fmt)
    return "\n".join([
        f"first {pairs} preference {kind} of the training data ({preview.objective}; model {preview.model}, "
        f"max_length {preview.max_length}).",
        f"What is scored: {scored}.",
        f"Each {kind[:-1]} as TRL's trainer builds it: the chat-templated prompt, then the answer{eos}; {padded} "
        f"with {preview.pad_token!r} on the right. Shown in the data's order; training draws them in an order "
        f"shuffled with seed {preview.seed}."])


__all__ = ["PAIRS_LEGEND", "pairs_header", "preview_pairs"]
