"""A `Run` that IPython shows while it is still training keeps its output line current; a background run
without a panel keeps its progress line in its own cell.

A `%%finetune --background` cell returns at once, so its `<Run 'x', lora, pending>` line was printed once
and then stayed "pending" for good, under a panel that said "finished". IPython displays a `Run` through
the display formatter registered here: the line is a display with an id, updated when the run starts,
ends or fails (not every step: the panel draws those).

The engine's own bars (answering eval rows, writing a GGUF file) are drawn the same way: a text line with
an id, emptied when the bar closes. A tqdm.auto widget bar would stay in the saved notebook as an output
whose widget state is not saved, which the reopened notebook shows as "Error displaying widget: model
not found".
"""

from __future__ import annotations

from typing import Any

from tqdm.std import tqdm

from nbtune.engine.records.run import Run
from nbtune.engine.training.events import NullObserver


def register(ipython: Any) -> None:
    from nbtune.engine.training.progress import draw_progress_with

    ipython.display_formatter.ipython_display_formatter.for_type(Run, show_run)
    if type(ipython).__name__ == "ZMQInteractiveShell":  # a kernel with a frontend; a terminal keeps tqdm's bar
        draw_progress_with(LineBar)


def unregister(ipython: Any) -> None:
    from nbtune.engine.training.progress import draw_progress_with

    ipython.display_formatter.ipython_display_formatter.type_printers.pop(Run, None)
    draw_progress_with(None)


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


class _Nowhere:
    """The file a LineBar's tqdm writes to: the line in the cell is drawn by `LineBar.display` instead."""

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


class LineBar(tqdm):
    """tqdm's text ('ev: answering:  50%|█████     | 2/4 [00:01<00:01, 1.5row/s]') as one text line in
    the cell, updated in place (a display with an id) and emptied when the bar closes with `leave=False`:
    what the saved notebook keeps is an empty text output, never a widget.

    Only on the kernel's main thread: a display made from a background run's thread would land under
    whichever cell runs at the time, so there the bar draws nothing (the run's panel or its progress
    line says it is evaluating)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        import threading

        self._handle: Any = None
        kwargs["file"] = _Nowhere()
        kwargs.pop("dynamic_ncols", None)  # no terminal to measure: tqdm's default width
        if threading.current_thread() is not threading.main_thread():
            kwargs["disable"] = True
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        from IPython.display import display

        text = str(self) if msg is None else msg
        if self._handle is None:
            if text:  # a bar closed before it drew leaves no output at all
                self._handle = display({"text/plain": text}, raw=True, display_id=True)
        else:
            self._handle.update({"text/plain": text}, raw=True)
        return True
