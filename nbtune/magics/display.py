"""A `Run` that IPython shows while it is still training keeps its output line current.

A `%%finetune --background` cell returns at once, so its `<Run 'x', lora, pending>` line was printed once
and then stayed "pending" for good, under a panel that said "finished". IPython displays a `Run` through
the display formatter registered here: the line is a display with an id, updated when the run starts,
ends or fails (not every step: the panel draws those).
"""

from __future__ import annotations

from typing import Any

from nbtune.engine.events import NullObserver
from nbtune.engine.result import Run


def register(ipython: Any) -> None:
    ipython.display_formatter.ipython_display_formatter.for_type(Run, show_run)


def unregister(ipython: Any) -> None:
    ipython.display_formatter.ipython_display_formatter.type_printers.pop(Run, None)


def show_run(run: Run) -> None:
    """Display `run`'s one-line summary; if it is still to finish, update that line when it does."""
    from IPython.display import display

    handle = display({"text/plain": repr(run)}, raw=True, display_id=True)
    if run.status in ("pending", "running") and handle is not None:
        run._observers.observers.append(_Refresh(handle))


class _Refresh(NullObserver):
    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def on_run_start(self, run: Run) -> None:
        self._update(run)

    def on_run_end(self, run: Run) -> None:
        self._update(run)
        self._detach(run)

    def on_error(self, run: Run, error: BaseException) -> None:
        self._update(run)
        self._detach(run)

    def _update(self, run: Run) -> None:
        self.handle.update({"text/plain": repr(run)}, raw=True)

    def _detach(self, run: Run) -> None:
        if self in run._observers.observers:
            run._observers.observers.remove(self)
