"""Progress bars of the engine's long steps (answering eval rows, writing a GGUF file): tqdm's text bar, or
the bar the notebook layer hands in.

Not tqdm.auto: in a notebook that draws an ipywidgets bar, and a saved notebook keeps the bar's output
(mime application/vnd.jupyter.widget-view+json) but not the widget's state, so the reopened notebook
shows "Error displaying widget: model not found" wherever a bar was. `%load_ext nbtune` hands in a bar
drawn as a text line in the cell and emptied when it closes (nbtune/magics/display.py); the engine never
imports IPython, so it is given here, as the kernel's cache of bases is given to engine/evaluation/scoring.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_bar: Callable[..., Any] | None = None


def progress_bar(*, total: int, desc: str, unit: str, leave: bool = False, disable: bool = False) -> Any:
    """A tqdm bar (update, set_postfix_str, close; a context manager): the class handed in by
    `draw_progress_with`, else tqdm's text bar on stderr (what tqdm.auto gives outside a notebook).
    `leave=False` clears it when it closes; `disable` draws nothing (a process other than the main one)."""
    if _bar is not None:
        return _bar(total=total, desc=desc, unit=unit, leave=leave, disable=disable)
    from tqdm.std import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=leave, disable=disable, dynamic_ncols=True)


def draw_progress_with(bar: Callable[..., Any] | None) -> None:
    """Draw the engine's bars with `bar` (a tqdm subclass, say); None for tqdm's text bar again."""
    global _bar
    _bar = bar
