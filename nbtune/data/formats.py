"""Data formats: detect which one a dataset is in and turn every example into chat messages.

Formats and the columns that identify them:
- chat: `messages` (or `conversations`) lists of `{role, content}` (ShareGPT `{from, value}` too)
- alpaca: `instruction`, `output`, optional `input` and `system`
- prompt_completion: `prompt` + `completion` (or `response`, or `question` + `answer`)
- text: `text`, trained as plain language modelling
- preference: `chosen` + `rejected` (+ `prompt`), text or chat messages: pairs for dpo / orpo / simpo / kto
- unpaired: `prompt` + `completion` + `label` (true: desirable): single answers for kto

For the preference formats the messages are the prompt and the chosen (or a desirable) answer: what `sft`
trains on, and the reference answer the task metrics score against.

Column names match whatever their case (`Question`, `Prompt `): datasets from spreadsheets and the hub
often capitalise them, and nothing else could be meant.

Every format but `text` becomes a list of messages whose assistant turns carry the loss, so one
tokeniser (see `nbtune.data.tokenize`) handles them all.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from nbtune.errors import DataError

_CHAT_COLUMNS = ("messages", "conversations")
_PAIR_COLUMNS = (("prompt", "completion"), ("prompt", "response"), ("question", "answer"))
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
          "bot": "assistant", "system": "system", "tool": "tool"}
# Every name a format reads, optional ones (`input`, `system`) included.
FORMAT_COLUMNS = ("messages", "conversations", "instruction", "input", "output", "system", "prompt", "completion",
                  "response", "question", "answer", "text", "chosen", "rejected", "label")
KNOWN_COLUMNS = ("messages/conversations | instruction+output | prompt+completion | prompt+response | question+answer"
                 " | text | prompt+chosen+rejected | prompt+completion+label")


def canonical_columns(columns: Iterable[Any]) -> dict[str, str]:
    """{column: the format column it stands for} for each column that differs from a format column only in
    case or surrounding spaces (`Question` for `question`). A column is left alone where that is ambiguous:
    the exact name is there too, or two columns fold to the same name."""
    columns = list(columns)
    folded: dict[str, list[str]] = {}
    for column in columns:
        if isinstance(column, str) and column.strip().lower() in FORMAT_COLUMNS:
            folded.setdefault(column.strip().lower(), []).append(column)
    return {found[0]: name for name, found in folded.items()
            if len(found) == 1 and found[0] != name and name not in columns}


def detect_format(columns: list[str], declared: str = "auto", *, field: str = "data") -> str:
    """The format of a dataset with these columns, checking a declared format has what it needs."""
    given, renames = list(columns), canonical_columns(columns)
    columns = [renames.get(c, c) for c in given]
    found = _guess(columns)
    if declared == "auto":
        if found is None:
            raise DataError(
                f"`{field}` has columns {given}, none of the known sets ({KNOWN_COLUMNS}).{_near_misses(columns)} "
                "Rename the column(s) or set `format`.",
                field=field,
            )
        return found
    needed = {"chat": ["messages"], "alpaca": ["instruction", "output"], "text": ["text"],
              "prompt_completion": ["prompt", "completion"], "preference": ["chosen", "rejected"],
              "unpaired": ["prompt", "completion", "label"]}[declared]
    if declared == "chat" and any(c in columns for c in _CHAT_COLUMNS):
        return declared
    if declared == "prompt_completion" and _pair(columns):
        return declared
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(
            f"`format: {declared}` needs column(s) {', '.join(missing)}, but `{field}` has {given}."
            f"{_near_misses(columns)}",
            field="format",
        )
    return declared


def to_messages(example: dict[str, Any], fmt: str) -> list[dict[str, str]]:
    """The example as chat messages (not for `text`)."""
    renames = canonical_columns(example)
    if renames:
        example = {renames.get(k, k): v for k, v in example.items()}
    if fmt == "chat":
        raw = next((example[c] for c in _CHAT_COLUMNS if example.get(c)), None)
        if not raw:
            others = [c for c, v in example.items() if v not in (None, "") and c not in _CHAT_COLUMNS]
            hint = (f"; it has {', '.join(others)} instead: give every row the same shape" if others
                    else "; drop empty rows")
            raise DataError(f"a row of `data` has no messages ({_short(example)}){hint}.", field="data")
        if isinstance(raw, str):
            raise DataError(f"`messages` must be a list of {{role, content}} dicts, got text {raw[:40]!r} "
                            "(a CSV cell cannot hold a list: use .jsonl or .json for chats).", field="data")
        return [_message(m) for m in raw]
    if fmt == "alpaca":
        prompt = _text(example, "instruction")
        if example.get("input"):
            prompt += "\n\n" + str(example["input"])
        messages = [{"role": "system", "content": str(example["system"])}] if example.get("system") else []
        return [*messages, {"role": "user", "content": prompt},
                {"role": "assistant", "content": _text(example, "output")}]
    if fmt in ("preference", "unpaired"):
        answer = "chosen" if fmt == "preference" else "completion"
        return [*_turns(example, "prompt", "user", required=fmt == "unpaired"), *_turns(example, answer, "assistant")]
    if fmt == "prompt_completion":
        prompt_col, answer_col = _pair(list(example)) or ("prompt", "completion")
        return [{"role": "user", "content": _text(example, prompt_col)},
                {"role": "assistant", "content": _text(example, answer_col)}]
    raise ValueError(f"format {fmt!r} has no messages")


def _turns(example: dict[str, Any], column: str, role: str, *, required: bool = True) -> list[dict[str, str]]:
    """A preference column as messages: text is one `role` turn, a list is chat messages as they are."""
    value = example.get(column)
    if isinstance(value, list) and value:
        return [_message(m) for m in value]
    if value is None and not required:
        return []
    return [{"role": role, "content": _text(example, column)}]


def _text(example: dict[str, Any], column: str) -> str:
    # A missing answer must not train as the word "None", nor an empty one as just the end-of-turn token.
    value = example.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"a row of `data` has an empty `{column}` ({_short(example)}); fill or drop such rows.",
                        field="data")
    return str(value)


def _short(example: dict[str, Any]) -> str:
    text = repr(example)
    return text if len(text) <= 80 else text[:77] + "..."


def _message(raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise DataError(f"a chat message must be a dict with role and content, got {raw!r}.", field="data")
    role = raw.get("role", raw.get("from"))
    content = raw.get("content", raw.get("value"))
    if role not in _ROLES or content is None:
        raise DataError(
            f"chat message {raw!r} needs `role` (user, assistant or system) and `content`.", field="data"
        )
    return {"role": _ROLES[role], "content": str(content)}


def _guess(columns: list[str]) -> str | None:
    if "chosen" in columns and "rejected" in columns:
        return "preference"
    if all(c in columns for c in ("prompt", "completion", "label")):
        return "unpaired"
    if any(c in columns for c in _CHAT_COLUMNS):
        return "chat"
    if "instruction" in columns and "output" in columns:
        return "alpaca"
    if _pair(columns):
        return "prompt_completion"
    if "text" in columns:
        return "text"
    return None


def _pair(columns: list[str]) -> tuple[str, str] | None:
    return next(((p, c) for p, c in _PAIR_COLUMNS if p in columns and c in columns), None)


def _near_misses(columns: list[str]) -> str:
    # Only close spellings (`anwser`, `promt`): a loose match such as `context` -> `text` would mislead.
    missing = [name for name in FORMAT_COLUMNS if name not in columns]
    hints = []
    for column in columns:
        if isinstance(column, str) and column not in FORMAT_COLUMNS:
            close = difflib.get_close_matches(column.strip().lower(), missing, n=1, cutoff=0.8)
            hints += [f"`{close[0]}` for `{column}`"] if close else []
    return f" Did you mean {', '.join(hints)}?" if hints else ""
