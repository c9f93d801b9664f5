"""`run.predictions()` as static HTML: a summary line, then one row per eval example with the base and the
tuned answer set against the reference, the characters that differ from it highlighted.

Pure strings (no widgets, no JavaScript): the table survives saving the notebook, nbconvert and GitHub.
"""

from __future__ import annotations

import difflib
import html
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nbtune.engine.evaluation.predictions import Predictions

SHOWN_ROWS = 20  # the worst ones; more make a notebook long to scroll (`.head(n)` and `.df` show others)
# Inline styles, not a <style> block: a sanitising frontend (GitHub, some viewers) drops <style> elements.
STYLES = {"same": "background:#e5f5e0", "extra": "background:#fcc",
          "miss": "background:#fdd;text-decoration:line-through;color:#a00",
          "right": "color:#238b45;font-weight:bold", "wrong": "color:#cb181d;font-weight:bold"}
CELL_STYLE = "vertical-align:top;text-align:left;font-family:monospace;white-space:pre-wrap"
# An answer or reference this short stays on one line: a browser breaks after a hyphen, so a narrow column
# showed "2046-04-0" above "7". Longer text wraps, at spaces first.
SHORT = 40
SHORT_STYLE = "vertical-align:top;text-align:left;font-family:monospace;white-space:pre"
HEAD_STYLE = "text-align:left"  # over the columns' text, which starts at the left (a notebook right-aligns <th>)


def _span(kind: str, text: str) -> str:
    return f"<span class='{kind}' style='{STYLES[kind]}'>{text}</span>"


def predictions_html(table: Predictions) -> str:
    """The whole table: summary, legend, and up to SHOWN_ROWS rows."""
    from nbtune.engine.evaluation.predictions import summary_line

    if not table.rows:
        return f"<p><i>{html.escape(summary_line(table))}</i></p>"
    has_base = any(r.get("base") is not None for r in table.rows)
    head = ["#", "prompt", "reference", *(["base answer"] if has_base else []), "tuned answer",
            *[_header(name, has_base) for name in table.metrics]]
    body = "".join(_row_html(table, row, has_base) for row in table.rows[:SHOWN_ROWS])
    more = (f"<p><i>{len(table) - SHOWN_ROWS} more rows, better ones: .df has them all</i></p>"
            if len(table) > SHOWN_ROWS else "")
    legend = (f"<small>answers: {_span('same', 'matches the reference')} {_span('extra', 'not in the reference')} "
              f"{_span('miss', 'missing from it')}</small>")
    return (f"<div class='nbtune-pred'><p><b>{html.escape(summary_line(table))}</b></p>{legend}"
            f"<table><thead><tr>{''.join(f'<th style={HEAD_STYLE!r}>{html.escape(h)}</th>' for h in head)}</tr></thead>"
            f"<tbody>{body}</tbody></table>{more}</div>")


def _header(name: str, has_base: bool) -> str:
    return f"{name} (base → tuned)" if has_base else name


def _row_html(table: Predictions, row: dict[str, Any], has_base: bool) -> str:
    reference = str(row["reference"])
    cells = [(str(row.get("row", "")), True), (html.escape(str(row["prompt"])), False),
             (html.escape(reference), _short(reference))]
    if has_base:
        cells.append((diff_html(row.get("base"), reference), _short(row.get("base"), reference)))
    cells.append((diff_html(row["tuned"], reference), _short(row["tuned"], reference)))
    cells += [(_scores(table, name, row, has_base), True) for name in table.metrics]
    return "<tr>" + "".join(f"<td style='{SHORT_STYLE if short else CELL_STYLE}'>{c}</td>"
                            for c, short in cells) + "</tr>"


def _short(*texts: Any) -> bool:
    """Whether a cell's text is short enough to keep on one line; an answer's cell counts the reference too,
    whose missing characters it shows struck through."""
    return sum(len(str(t)) for t in texts if t is not None) <= SHORT


def diff_html(answer: str | None, reference: str) -> str:
    """`answer` with the spans that match `reference` green, its extra characters red and the reference's
    missing ones struck through (difflib's matching blocks, character level)."""
    if answer is None:
        return "-"
    parts = []
    matcher = difflib.SequenceMatcher(a=answer, b=reference, autojunk=False)
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        if op == "equal":
            parts.append(_span("same", html.escape(answer[a0:a1])))
            continue
        if a1 > a0:
            parts.append(_span("extra", html.escape(answer[a0:a1])))
        if b1 > b0:
            parts.append(_span("miss", html.escape(reference[b0:b1])))
    return "".join(parts) or "<i>(empty)</i>"


def _scores(table: Predictions, name: str, row: dict[str, Any], has_base: bool) -> str:
    tuned = _score(table, name, row.get(name))
    return f"{_score(table, name, row.get(f'base_{name}'))} → {tuned}" if has_base else tuned


def _score(table: Predictions, name: str, value: Any) -> str:
    if not isinstance(value, (int, float)) or math.isnan(value):
        return "-"
    best = table.best.get(name, 1.0)
    mark = "right" if value >= best - 1e-9 else "wrong"
    return _span(mark, f"{value:.3g}")
