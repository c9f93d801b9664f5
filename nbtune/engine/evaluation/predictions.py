"""`run.predictions()`: the evaluation rows as a table you can read, sort and filter.

Each row is one eval example: the prompt, the reference answer, what the base model answered, what the
tuned model answered, and every task metric for both. Worst rows come first, so the failures are what a
person sees; filters narrow it down:

    >>> table = run.predictions()                   # doctest: +SKIP
    >>> table.wrong()                               # rows the tuned model still gets wrong  # doctest: +SKIP
    >>> table.broken()                              # right before tuning, wrong after       # doctest: +SKIP
    >>> table.df                                    # a pandas DataFrame                     # doctest: +SKIP

In a notebook the table shows as static HTML (it survives saving) with each answer's difference from the
reference highlighted. The rows are saved beside run.json as predictions.jsonl, so a loaded run shows them
without generating again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

FILE = "predictions.jsonl"
TEXT_KEYS = ("row", "prompt", "reference", "base", "tuned")


class Predictions:
    """Evaluation rows (dicts: row, prompt, reference, base, tuned, and per metric `name` and `base_name`)."""

    def __init__(self, rows: Sequence[dict[str, Any]], metrics: Sequence[str], *, run: str = "",
                 best: dict[str, float] | None = None, title: str = "", total: int | None = None) -> None:
        self.rows = list(rows)
        self.total = total  # rows in the table this one was filtered from (None: this is the whole table)
        self.metrics = list(metrics)  # the first one orders the rows and decides right from wrong
        self.run = run
        self.best = dict(best or {})  # a perfect answer's score per metric (1.0; 100 for bleu/chrf)
        self.title = title

    # ------------------------------------------------------------------ reading
    @property
    def primary(self) -> str | None:
        return self.metrics[0] if self.metrics else None

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]

    @property
    def df(self) -> Any:
        """The rows as a pandas DataFrame, indexed by the eval row's position."""
        import pandas as pd

        return pd.DataFrame(self.rows).set_index("row") if self.rows else pd.DataFrame(columns=TEXT_KEYS)

    def means(self) -> dict[str, float | None]:
        """Mean of each metric over these rows, for the tuned model and (as `base_<name>`) the base."""
        out = {}
        for name in self.metrics:
            for key in (name, f"base_{name}"):
                values = [r[key] for r in self.rows if isinstance(r.get(key), (int, float))]
                out[key] = sum(values) / len(values) if values else None
        return out

    # ------------------------------------------------------------------ filtering
    def where(self, keep: Callable[[dict[str, Any]], bool], title: str = "") -> Predictions:
        """The rows for which `keep(row)` is true (still worst first)."""
        return Predictions([r for r in self.rows if keep(r)], self.metrics, run=self.run, best=self.best,
                           title=title or self.title, total=self.total if self.total is not None else len(self))

    def wrong(self) -> Predictions:
        """Rows where the tuned answer falls short of a perfect score on the first metric."""
        return self.where(lambda r: not self._right(r, self.primary), "wrong")

    def right(self) -> Predictions:
        return self.where(lambda r: self._right(r, self.primary), "right")

    def changed(self) -> Predictions:
        """Rows where tuning changed the answer (the base answered something else)."""
        return self.where(lambda r: r.get("base") is not None and r["base"].strip() != r["tuned"].strip(),
                          "changed by tuning")

    def fixed(self) -> Predictions:
        """Wrong before tuning, right after."""
        return self.where(lambda r: self._right(r, self.primary) and self._right(r, f"base_{self.primary}") is False,
                          "fixed by tuning")

    def broken(self) -> Predictions:
        """Right before tuning, wrong after."""
        return self.where(lambda r: not self._right(r, self.primary) and self._right(r, f"base_{self.primary}"),
                          "broken by tuning")

    def sort(self, by: str | None = None, *, worst_first: bool = True) -> Predictions:
        """Ordered by metric `by` (default: the first), worst first unless `worst_first=False`."""
        key = by or self.primary
        if key is not None and not any(key in r for r in self.rows):
            from nbtune.errors import NbtuneError, did_you_mean

            columns = sorted({k for r in self.rows for k in r} - set(TEXT_KEYS))
            raise NbtuneError(f"the predictions have no column {key!r}.{did_you_mean(key, columns)} Columns: "
                              f"{', '.join(columns)}.", field="by")
        return Predictions(sort_rows(self.rows, key, worst_first=worst_first), self.metrics, run=self.run,
                           best=self.best, title=self.title, total=self.total)

    def head(self, n: int = 10) -> Predictions:
        """The first `n` rows (the worst, unless sorted otherwise)."""
        return self.where(lambda r: r in self.rows[:n], self.title)

    def _right(self, row: dict[str, Any], key: str | None) -> bool | None:
        """Whether `row` scores perfectly on `key` (None when it has no such score)."""
        if key is None:
            return None
        value = row.get(key)
        if not isinstance(value, (int, float)) or math.isnan(value):
            return None
        best = self.best.get(key.removeprefix("base_"), 1.0)
        return value >= best - 1e-9

    # ------------------------------------------------------------------ showing
    def __repr__(self) -> str:  # a notebook shows it as HTML: nbtune/widgets/predictions_view.py
        return predictions_text(self)


def metric_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The tuned model's metric columns of `rows` (numeric, not text, not the base's), in column order."""
    first = rows[0] if rows else {}
    return [k for k, v in first.items() if k not in TEXT_KEYS and not k.startswith("base_")
            and isinstance(v, (int, float)) and not isinstance(v, bool)]


def row_key(row: dict[str, Any]) -> tuple[str, str]:
    """What makes two runs' rows the same eval example: the prompt and the reference."""
    return (str(row["prompt"]), str(row["reference"]))


def sort_rows(rows: Sequence[dict[str, Any]], key: str | None, *, worst_first: bool = True) -> list[dict[str, Any]]:
    """Rows by `key` (missing scores last), then by their position, so equal scores keep eval order."""
    def order(row: dict[str, Any]) -> tuple[int, float, int]:
        value = row.get(key) if key is not None else None
        if not isinstance(value, (int, float)) or math.isnan(value):
            return (1, 0.0, row.get("row", 0))
        return (0, value if worst_first else -value, row.get("row", 0))

    return sorted(rows, key=order)


def summary_line(table: Predictions) -> str:
    """"run 'a': 64 rows · exact_match 0.91 (base 0.12) · 50 fixed, 2 broken, 55 changed by tuning"; a filtered
    table says what it kept: "run 'a': 6 of 64 rows wrong · ..."."""
    of = f" of {table.total}" if table.total is not None and table.total != len(table) else ""
    what = f"{len(table)}{of} rows" + (f" {table.title}" if table.title else "")
    parts = [(f"run {table.run!r}: " if table.run else "") + what]
    if not table.rows:
        return parts[0] + ": none"
    means = table.means()
    for name in table.metrics:
        tuned, base = means.get(name), means.get(f"base_{name}")
        if tuned is not None:
            parts.append(f"{name} {tuned:.3g}" + (f" (base {base:.3g})" if base is not None else ""))
    if any(r.get("base") is not None for r in table.rows):
        parts.append(f"{len(table.fixed())} fixed, {len(table.broken())} broken, {len(table.changed())} changed "
                     "by tuning")
    return " · ".join(parts)


def predictions_text(table: Predictions, limit: int = 10) -> str:
    """Plain text: the summary, then the first `limit` rows (prompt, reference, base, tuned, score)."""
    lines = [summary_line(table)]
    for row in table.rows[:limit]:
        score = f"  {table.primary}={row.get(table.primary)!s}" if table.primary else ""
        lines.append(f"#{row.get('row')}{score}  prompt: {_short(row['prompt'])}")
        lines.append(f"    reference: {_short(row['reference'])}")
        if row.get("base") is not None:
            lines.append(f"    base:      {_short(row['base'])}")
        lines.append(f"    tuned:     {_short(row['tuned'])}")
    if len(table) > limit:
        lines.append(f"... {len(table) - limit} more rows (.df has them all)")
    return "\n".join(lines)


def _short(text: Any, width: int = 100) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


# ---------------------------------------------------------------------- saving
def write_rows(folder: Path, rows: Sequence[dict[str, Any]]) -> None:
    """predictions.jsonl in `folder`: one row per line (readable by pandas.read_json(lines=True))."""
    text = "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)
    (folder / FILE).write_text(text, encoding="utf-8")


def read_rows(folder: Path) -> list[dict[str, Any]]:
    """The rows a saved run's predictions.jsonl holds; none when the file is missing or damaged."""
    try:
        lines = (Path(folder) / FILE).read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError):
        return []
    return [r for r in rows if isinstance(r, dict) and "tuned" in r]
