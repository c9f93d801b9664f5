"""The kernel's runs (`nbtune.runs`, `%finetune_runs`) and the saved runs (`nbtune.history()`) as HTML tables,
from the plain rows their engine objects give (`Runs.table()`, `RunHistory.table()`)."""

from __future__ import annotations

from html import escape
from typing import Any

from nbtune.engine.records.history import COLUMNS
from nbtune.engine.records.text import cell


def table_html(rows: list[dict[str, Any]], columns: list[str] | tuple[str, ...] | None = None) -> str:
    """Rows (dicts) as one HTML table, every value escaped."""
    names = list(columns if columns is not None else (rows[0] if rows else []))
    head = "".join(f"<th>{escape(str(c))}</th>" for c in names)
    body = "".join("<tr>" + "".join(f"<td>{escape(cell(row.get(c)))}</td>" for c in names) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def runs_html(runs: Any) -> str:
    """`nbtune.runs`: a row per run of this kernel (status and key metrics)."""
    rows = runs.table()
    return table_html(rows) if rows else "<i>no runs yet</i>"


def history_html(saved: Any) -> str:
    """`nbtune.history()`: a row per saved run, newest first."""
    rows = saved.table()
    return table_html(rows, COLUMNS) if rows else f"<i>no saved runs under {escape(str(saved.root))}</i>"
