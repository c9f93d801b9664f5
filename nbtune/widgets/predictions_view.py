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
    from nbtune.engine.predictions import Predictions

SHOWN_ROWS = 50  # more rows make a notebook slow to scroll; `.df` has them all
_STYLE = ("<style>.nbtune-pred td{vertical-align:top;text-align:left;font-family:monospace;white-space:pre-wrap}"
          ".nbtune-pred .miss{background:#fdd;text-decoration:line-through;color:#a00}"
          ".nbtune-pred .extra{background:#fcc}.nbtune-pred .same{background:#e5f5e0}"
          ".nbtune-pred .right{color:#238b45;font-weight:bold}.nbtune-pred .wrong{color:#cb181d;font-weight:bold}"
          "</style>")


def predictions_html(table: Predictions) -> str:
    """The whole table: summary, legend, and up to SHOWN_ROWS rows."""
    from nbtune.engine.predictions import summary_line

    if not table.rows:
        return "<i>no prediction rows (the run has no eval data with answers, or none were scored)</i>"
    has_base = any(r.get("base") is not None for r in table.rows)
    head = ["#", "prompt", "reference", *(["base answer"] if has_base else []), "tuned answer",
            *[_header(name, has_base) for name in table.metrics]]
    body = "".join(_row_html(table, row, has_base) for row in table.rows[:SHOWN_ROWS])
    more = (f"<p><i>{len(table) - SHOWN_ROWS} more rows: .df has them all</i></p>"
            if len(table) > SHOWN_ROWS else "")
    legend = ("<small>answers: <span class='same'>matches the reference</span> "
              "<span class='extra'>not in the reference</span> <span class='miss'>missing from it</span></small>")
    return (f"<div class='nbtune-pred'>{_STYLE}<p><b>{html.escape(summary_line(table))}</b></p>{legend}"
            f"<table><thead><tr>{''.join(f'<th>{html.escape(h)}</th>' for h in head)}</tr></thead>"
            f"<tbody>{body}</tbody></table>{more}</div>")


def _header(name: str, has_base: bool) -> str:
    return f"{name} (base → tuned)" if has_base else name


def _row_html(table: Predictions, row: dict[str, Any], has_base: bool) -> str:
    reference = str(row["reference"])
    cells = [str(row.get("row", "")), html.escape(str(row["prompt"])), html.escape(reference)]
    if has_base:
        cells.append(diff_html(row.get("base"), reference))
    cells.append(diff_html(row["tuned"], reference))
    cells += [_scores(table, name, row, has_base) for name in table.metrics]
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def diff_html(answer: str | None, reference: str) -> str:
    """`answer` with the spans that match `reference` green, its extra characters red and the reference's
    missing ones struck through (difflib's matching blocks, character level)."""
    if answer is None:
        return "-"
    parts = []
    matcher = difflib.SequenceMatcher(a=answer, b=reference, autojunk=False)
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        if op == "equal":
            parts.append(f"<span class='same'>{html.escape(answer[a0:a1])}</span>")
            continue
        if a1 > a0:
            parts.append(f"<span class='extra'>{html.escape(answer[a0:a1])}</span>")
        if b1 > b0:
            parts.append(f"<span class='miss'>{html.escape(reference[b0:b1])}</span>")
    return "".join(parts) or "<i>(empty)</i>"


def _scores(table: Predictions, name: str, row: dict[str, Any], has_base: bool) -> str:
    tuned = _score(table, name, row.get(name))
    return f"{_score(table, name, row.get(f'base_{name}'))} → {tuned}" if has_base else tuned


def _score(table: Predictions, name: str, value: Any) -> str:
    if not isinstance(value, (int, float)) or math.isnan(value):
        return "-"
    best = table.best.get(name, 1.0)
    mark = "right" if value >= best - 1e-9 else "wrong"
    return f"<span class='{mark}'>{value:.3g}</span>"
