"""Preference data: pairs (`prompt`, `chosen`, `rejected`) and labelled single answers (`prompt`,
`completion`, `label`), as TRL's trainers take them.

Every row becomes TRL's conversational form, so the model's chat template frames it exactly as it frames an
`sft` row (system prompt, turns, end-of-turn token):

    {"prompt": [{"role": "user", "content": ...}], "chosen": [{"role": "assistant", ...}], "rejected": [...]}
    {"prompt": [...], "completion": [{"role": "assistant", ...}], "label": True}

Text columns are one user turn and one assistant turn; chat columns (lists of messages) are kept as they
are, and pairs without a `prompt` column have their shared leading messages as the prompt. A row with a
missing or empty side, the same answer chosen and rejected, or a label that is no boolean is refused with
its row number. Each row also gets its `length` in tokens (prompt and longer answer), for the memory check.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nbtune.data.formats import _message
from nbtune.errors import DataError

if TYPE_CHECKING:
    from nbtune.config import RunConfig


def check_data_for_objective(config: RunConfig, fmt: str, dataset: Any, field: str = "data") -> None:
    """Refuse data that does not fit the run's objective, as the objective checks it (its `check_data`:
    the formats it takes, then for preferences every row, before any weights load)."""
    from nbtune.objectives.registry import get_objective

    get_objective(config.objective).check_data(config, fmt, dataset, field)


def check_rows(fmt: str, dataset: Any, field: str = "data") -> None:
    """Every row of preference data (`fmt` preference or unpaired) converted as training converts it: a bad
    row is refused with its number."""
    convert = _pair if fmt == "preference" else _unpaired
    for index, example in enumerate(dataset):
        convert(example, index, field)


def preference_rows(dataset: Any, fmt: str, *, tokenizer: Any, field: str = "data") -> Any:
    """`dataset` in TRL's conversational form, checked row by row, with a `length` column."""
    import datasets

    convert = _pair if fmt == "preference" else _unpaired
    rows = []
    for index, example in enumerate(dataset):
        row = convert(example, index, field)
        answers = [row[k] for k in ("chosen", "rejected", "completion") if k in row]
        row["length"] = max(_tokens(tokenizer, row["prompt"] + answer) for answer in answers)
        rows.append(row)
    return datasets.Dataset.from_list(rows)


def _pair(example: dict[str, Any], index: int, field: str) -> dict[str, Any]:
    chosen = _side(example, "chosen", index, field)
    rejected = _side(example, "rejected", index, field)
    if example.get("prompt") is not None:
        prompt = _side(example, "prompt", index, field, role="user")
    else:
        prompt, chosen, rejected = _shared_prompt(chosen, rejected, index, field)
    if chosen == rejected:
        raise DataError(f"row {index} of `{field}` has the same answer as chosen and rejected "
                        f"({_shown(chosen)}): it teaches nothing; drop it.", field=field)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _unpaired(example: dict[str, Any], index: int, field: str) -> dict[str, Any]:
    label = example.get("label")
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):
        label = label.strip().lower() == "true"  # a CSV cell, or a column the loader kept as text
    if not isinstance(label, bool):
        raise DataError(f"row {index} of `{field}` has label {label!r}; a KTO label is true (a desirable answer) "
                        "or false (an undesirable one).", field=field)
    return {"prompt": _side(example, "prompt", index, field, role="user"),
            "completion": _side(example, "completion", index, field), "label": label}


def _side(example: dict[str, Any], column: str, index: int, field: str, role: str = "assistant") -> list[dict]:
    value = example.get(column)
    if isinstance(value, list) and value:
        return [_message(m) for m in value]
    if value is None or (isinstance(value, str) and not value.strip()) or isinstance(value, list):
        raise DataError(f"row {index} of `{field}` has an empty `{column}`; every row needs a prompt and both "
                        "answers: fill or drop such rows.", field=field)
    return [{"role": role, "content": str(value)}]


def _shared_prompt(chosen: list[dict], rejected: list[dict], index: int, field: str) -> tuple[list, list, list]:
    """Without a `prompt` column: the leading messages both chats share are the prompt (TRL's implicit
    prompt, taken whole messages at a time), the rest are the answers."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0 or chosen[shared]["role"] != "assistant":
        raise DataError(f"row {index} of `{field}` has no `prompt`, and its chosen and rejected chats share no "
                        "opening messages to take as one; add a `prompt` column.", field=field)
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _tokens(tokenizer: Any, messages: list[dict]) -> int:
    return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def _shown(messages: list[dict]) -> str:
    text = " / ".join(m["content"] for m in messages)
    return repr(text if len(text) <= 60 else text[:57] + "...")


__all__ = ["check_data_for_objective", "check_rows", "preference_rows"]
