"""The shipped demo task: rewrite a date written in words as ISO 8601 (`YYYY-MM-DD`).

Base SmolLM2-135M-Instruct gets about one answer in ten exactly right (it chats, keeps the input format, or
invents the year); a LoRA run of a few dozen steps learns the month table and the format. The task is
generated from a fixed seed, so every machine trains and scores on the same examples, and the held-out
split shares no date with the training split.

    >>> train, test = demo_splits()
    >>> train[0]["prompt"], train[0]["completion"]  # doctest: +SKIP
    ('Convert this date to ISO format (YYYY-MM-DD): 3 Aug 1987', '1987-08-03')
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
