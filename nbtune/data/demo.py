"""The shipped demo task: rewrite a date written in words as ISO 8601 (`YYYY-MM-DD`).

Base SmolLM2-135M-Instruct gets about one answer in ten exactly right (it chats, keeps the input format, or
invents the year); a LoRA run of a few dozen steps learns the month table and the format. The task is
generated from a fixed seed, so every machine trains and scores on the same examples, and the held-out
split shares no date with the training split.

    >>> train, test = demo_splits()
    >>> train[0]["prompt"], train[0]["completion"]  # doctest: +SKIP
    ('Convert this date to ISO format (YYYY-MM-DD): 3 Aug 1987', '1987-08-03')

`data: demo_pairs` is the same task as preference pairs (`demo_pair_splits`): chosen is the right ISO
date, rejected a plausible wrong answer of the kinds the base model and early runs give: day and month
swapped, the day off by a little, the year's last digits wrong, or the right date in another format.
"""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

PROMPT = "Convert this date to ISO format (YYYY-MM-DD): {date}"
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
TRAIN_SIZE = 512
TEST_SIZE = 64
_SEED = 20240501
_FIRST = dt.date(1900, 1, 1).toordinal()
_LAST = dt.date(2099, 12, 31).toordinal()


def _ordinal(day: int) -> str:
    if 11 <= day % 100 <= 13:
        return f"{day}th"
    return f"{day}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(day % 10, 'th') }"


def _spell(date: dt.date, style: int) -> str:
    month = MONTHS[date.month - 1]
    return [
        f"{month} {date.day}, {date.year}",
        f"{date.day} {month} {date.year}",
        f"{month[:3]} {date.day} {date.year}",
        f"the {_ordinal(date.day)} of {month}, {date.year}",
        f"{date.day} {month[:3]} {date.year}",
        f"{month} {_ordinal(date.day)} {date.year}",
    ][style]


def _examples(rng: random.Random, count: int, taken: set[dt.date]) -> list[dict[str, Any]]:
    rows = []
    while len(rows) < count:
        date = dt.date.fromordinal(rng.randint(_FIRST, _LAST))
        if date in taken:
            continue
        taken.add(date)
        text = _spell(date, rng.randrange(6))
        rows.append({"prompt": PROMPT.format(date=text), "completion": date.isoformat()})
    return rows


def demo_splits() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, test) rows with `prompt` and `completion`; the same on every call and machine."""
    rng = random.Random(_SEED)
    taken: set[dt.date] = set()
    test = _examples(rng, TEST_SIZE, taken)
    train = _examples(rng, TRAIN_SIZE, taken)
    return train, test


def _wrong(date: dt.date, rng: random.Random) -> str:
    """A plausible wrong answer to `date`: never the right ISO date, never empty."""
    kinds = ["format", "day", "year"] + (["swap"] * 2 if date.day <= 12 and date.day != date.month else [])
    kind = rng.choice(kinds)
    if kind == "swap":
        return f"{date.year:04d}-{date.day:02d}-{date.month:02d}"
    if kind == "day":
        day = date.day + rng.choice([-10, -2, -1, 1, 2, 10])
        day = day if 1 <= day <= 28 else (date.day % 28) + 1
        return f"{date.year:04d}-{date.month:02d}-{day:02d}"
    if kind == "year":
        year = date.year + rng.choice([-20, -10, -1, 1, 10, 20])
        return f"{year:04d}-{date.month:02d}-{date.day:02d}"
    return rng.choice([f"{date.day:02d}/{date.month:02d}/{date.year}", f"{date.month:02d}/{date.day:02d}/{date.year}",
                       f"{date.day:02d}-{date.month:02d}-{date.year}"])


def demo_pair_splits() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, test) rows with `prompt`, `chosen` (the demo's answer) and `rejected` (a wrong one); the
    prompts and chosen answers are `demo_splits()`'s, row for row."""
    rng = random.Random(_SEED + 1)

    def pairs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for row in rows:
            date = dt.date.fromisoformat(row["completion"])
            out.append({"prompt": row["prompt"], "chosen": row["completion"], "rejected": _wrong(date, rng)})
        return out

    train, test = demo_splits()
    return pairs(train), pairs(test)
