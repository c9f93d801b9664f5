"""`objective: sft` (the default): supervised fine-tuning, learn to write the answers. Chat-templated examples,
the loss on the answer tokens only (everything with `train_on_prompt`), batches of similar length, on
transformers' Trainer with nbtune's answer-only loss (engine/training/trainer.py `make_trainer`).

Its preview is the Trainer's first batch exactly: tokenised as training tokenises (this module's `tokenize`),
ordered as the Trainer deals it out (length-grouped, shuffled with `seed`: engine/training/sampling.py, which
makes that order depend on the seed alone, so it is reproduced exactly) and padded with the training collator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nbtune.errors import DataError
from nbtune.objectives.registry import ObjectiveSpec, register_objective

if TYPE_CHECKING:
    from pathlib import Path

    from nbtune.config import RunConfig
    from nbtune.data.preview import BatchPreview, ExamplePreview
    from nbtune.engine.compute.memory import PeakSampler
    from nbtune.engine.records.run import Run
    from nbtune.engine.training.guards import NonFiniteGuard

NAME = "sft"
# Every format but labelled single answers: pairs train on their chosen answer.
FORMATS = ("alpaca", "chat", "prompt_completion", "text", "preference")
_NO_LIMIT = 1 << 30  # a max_length no text reaches: the length an example has before the cut


def check_data(config: RunConfig, fmt: str, dataset: Any, field: str) -> None:
    if fmt not in FORMATS:
        raise DataError("`data` has prompt, completion and label columns: answers labelled desirable or not. "
                        "`objective: sft` would learn the undesirable ones too; set `objective: kto`, or drop "
                        "the `label` column and the undesirable rows.", field="objective")


def tokenize(train_records: Any, eval_records: Any, fmt: str, tokenizer: Any, config: RunConfig) -> tuple[Any, Any]:
    from nbtune.data import tokenize_dataset
    from nbtune.data.splits import data_key

    settings = dict(tokenizer=tokenizer, fmt=fmt, max_length=config.max_length,
                    train_on_prompt=config.train_on_prompt, cache_key=data_key(config))
    train_set = tokenize_dataset(train_records, field="data", **settings)
    eval_set = tokenize_dataset(eval_records, field="eval_data", **settings) if eval_records is not None else None
    return train_set, eval_set


def trainer(run: Run, train_set: Any, eval_set: Any, memory: PeakSampler, *, guard: NonFiniteGuard,
            scratch: Path, shared_stop: Any = None) -> Any:
    from nbtune.engine.training.trainer import make_trainer

    return make_trainer(run, train_set, eval_set, memory, guard=guard, scratch=scratch, shared_stop=shared_stop)


def scores(train_on_prompt: bool, fmt: str) -> str:
    """What the loss is on, as the preview's header says it."""
    if fmt == "text":
        return "every token (plain text rows)"
    return "every token (`train_on_prompt`)" if train_on_prompt else "the answers only"


# ---------------------------------------------------------------- preview: the Trainer's first batch
def preview(config: RunConfig, tokenizer: Any, n: int, train: Any, fmt: str) -> BatchPreview:
    """The first `n` examples in the order training sees them, encoded, ordered and padded as training does."""
    from nbtune.data.preview import BatchPreview

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
        dropped=len(train) - len(train_set), objective=config.objective)


def preview_header(preview: BatchPreview) -> str:
    """What is shown and how it was made, in a sentence or three."""
    import math

    n, size = len(preview.examples), preview.batch_size
    batches = math.ceil(n / size) if n else 0
    what = (f"first training batch: {n} of its {min(size, preview.total)} examples" if batches <= 1 else
            f"first {batches} training batches: {n} examples, {size} per batch")
    multiple = f", a multiple of {preview.pad_to_multiple_of}" if preview.pad_to_multiple_of else ""
    lines = [f"{what} (batch_size {size}, seed {preview.seed}); model {preview.model}, format {preview.fmt}, "
             f"max_length {preview.max_length}, loss on {scores(preview.train_on_prompt, preview.fmt)}.",
             f"Order: the Trainer's own (length-grouped, shuffled with seed {preview.seed}), reproduced exactly. "
             f"Padding: the training collator's, to the batch's longest{multiple}, on the {preview.padding_side} "
             f"with {preview.pad_token!r}."]
    if preview.dropped:
        lines.append(f"{preview.dropped} example(s) have no answer token left and are not trained on.")
    return "\n".join(lines)


def _training_view(config: RunConfig, train: Any, fmt: str, tokenizer: Any) -> tuple[Any, list[int], Any, Any]:
    """(tokenised train set, the Trainer's order of it, the training collator, the device policy), each from
    the function training itself calls."""
    from nbtune.engine.compute import device
    from nbtune.engine.training.sampling import EpochSeededLengthGroupedSampler
    from nbtune.engine.training.trainer import make_collator

    train_set, _ = tokenize(train, None, fmt, tokenizer, config)  # its cache, warmed
    # DataOrder (engine/training/sampling.py) groups over the global batch, train_batch_size x grad_accum x
    # processes, and draws epoch 0 from the seed alone; tests/test_preview.py checks this against a real Trainer.
    group = config.batch_size * config.grad_accum * config.num_processes
    order = list(EpochSeededLengthGroupedSampler(group, train_set["length"], config.seed))
    policy = device.current()
    return train_set, order, make_collator(tokenizer, policy), policy


def _source_rows(train: Any, train_set: Any, tokenizer: Any, fmt: str, config: RunConfig) -> list[int]:
    """For each tokenised example, its row in `train`: the same unless rows without an answer were dropped."""
    from nbtune.data.tokenize import IGNORE_INDEX, encode

    if len(train_set) == len(train):
        return list(range(len(train)))
    settings = dict(tokenizer=tokenizer, fmt=fmt, max_length=config.max_length,
                    train_on_prompt=config.train_on_prompt)
    return [i for i, record in enumerate(train)  # as tokenize_dataset filters: some label left
            if any(label != IGNORE_INDEX for label in encode(record, **settings)["labels"])]


def _example(position: int, row: int, record: dict[str, Any], batch: Any, j: int, tokenizer: Any, fmt: str,
             config: RunConfig) -> ExamplePreview:
    from nbtune.data.preview import ExamplePreview, readable_pieces, rendered_text, special_ids
    from nbtune.data.tokenize import IGNORE_INDEX, encode

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


register_objective(ObjectiveSpec(
    name=NAME,
    summary="the answers: chat template, loss on the answer tokens (transformers' Trainer)",
    kind="supervised",
    formats=FORMATS,
    check_data=check_data,
    tokenize=tokenize,
    trainer=trainer,
    preview=preview,
    preview_header=preview_header,
    scores=scores,
    train_on_prompt="for a loss on the prompt's tokens too",
))
