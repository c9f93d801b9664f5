"""A `Run` that IPython shows while it is still training keeps its output line current; a background run
without a panel keeps its progress line in its own cell.

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
        run.observe(_Refresh(handle))


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
        run.unobserve(self)


class ProgressLine(NullObserver):
    """A background run's progress (`--background --no-panel`) as one line in the cell that started it.

    A progress bar drawn from the training thread lands under whichever cell runs when it first draws;
    a display with an id, made here while the starting cell runs, is updated in place wherever the
    notebook is by then. Throttled: a line per `min_interval` seconds at most.
    """

    def __init__(self, min_interval: float = 0.5) -> None:
        self.min_interval = min_interval
        self._last = 0.0
        self.handle: Any = None

    def show(self) -> None:
        """Put the line in the cell that is running now (once the run's config and data passed)."""
        from IPython.display import display

        self.handle = display({"text/plain": "waiting for the first step ..."}, raw=True, display_id=True)

    def on_step(self, run: Run, record: dict[str, Any]) -> None:
        import time

        now = time.monotonic()
        if now - self._last < self.min_interval and record["step"] < run.total_steps:
            return
        self._last = now
        loss = f", loss {record['loss']:.4f}" if record.get("loss") is not None else ""
        self._show(f"{run.name}: step {record['step']}/{run.total_steps}{loss}, "
                   f"{record.get('tokens_per_second', 0):.0f} tokens/s")

    def on_run_end(self, run: Run) -> None:
        self._show(repr(run))

    def on_error(self, run: Run, error: BaseException) -> None:
        self._show(f"{run.name}: failed: {run.error or error}")

    def _show(self, text: str) -> None:
        if self.handle is not None:
            self.handle.update({"text/plain": text}, raw=True)
