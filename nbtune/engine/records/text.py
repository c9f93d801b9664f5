"""How tables in text and HTML show a value: one function, so every table of runs reads the same."""

from __future__ import annotations

from typing import Any


def cell(value: Any) -> str:
    """'-' for nothing, a float to 4 significant digits, anything else as `str`."""
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
