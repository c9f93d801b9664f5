"""The live sweep panel: an observer of a sweep and of each trial's run, showing the trials table, the
best-so-far chart, the optimised metric against each parameter and the running trial's loss, with a Stop button.

The table and charts are redrawn when a trial starts or ends (a few per sweep); the running trial's loss
chart at most 4 times per second, as in the run panel, plus on its last step and on each evaluation. When
the sweep ends, the widget is replaced in place (same display id) by a static HTML snapshot that survives
saving the notebook.

As with the run panel, Jupyter delivers widget clicks only while the kernel is free, so the Stop button is
shown for background sweeps; a sweep that blocks its cell is stopped by interrupting the kernel::

    panel = SweepPanel(interactive_stop=True)
    panel.show()          # in the cell that starts the sweep
    # the engine calls panel.on_sweep_start(sweep), on_trial_start(sweep, run, params), the run's own
    # events, on_trial_end(sweep, record) and on_sweep_end(sweep)
"""

from __future__ import annotations

import html
import time
from typing import Any

from nbtune.engine.training.events import NullObserver
from nbtune.widgets import render, sweep_render

STOP_HINT = "<small>to stop: interrupt the kernel (■ or I,I); finished trials are kept</small>"


class SweepPanel(NullObserver):
    """ipywidgets view of one sweep; `show()` it, then pass it as an observer of the sweep (the engine adds
    it to each trial's run as well)."""

    def __init__(self, *, interactive_stop: bool, min_interval: float = 0.25, log_scale: bool = False) -> None:
        import ipywidgets as w

        self.min_interval, self.log_scale = min_interval, log_scale
        self.status = w.HTML("<i>starting the sweep ...</i>")
        self.table = w.HTML("")
        self.charts = w.HTML("")
        self.trial = w.HTML("")  # the running trial: name, params, its progress line
        self.chart = w.HTML(render.loss_chart([], []))
        self.stop_button = w.Button(description="Stop", icon="stop", button_style="danger",
                                    tooltip="End the sweep after the current step; finished trials are kept.")
        self.controls = self.stop_button if interactive_stop else w.HTML(STOP_HINT)
        self.widget = w.VBox([self.status, self.table, self.charts, self.trial, self.chart, self.controls])
        self.renders = 0  # loss chart redraws, for tests of the throttle
        self._last = 0.0
        self._sweep: Any = None
        self._run: Any = None
        self._running: dict[str, Any] | None = None  # the trial in progress, as a partial record
        self._handle: Any = None
        self.stop_button.on_click(self._on_stop)

    # --------------------------------------------------------------- display
    def show(self) -> None:
        """Display the widget in the current cell, remembering where, for the final snapshot."""
        from IPython.display import display

        self._handle = display(self.widget, display_id=True)

    def snapshot(self) -> str:
        """The sweep's static HTML (status, table, charts), as left in the cell at the end."""
        return sweep_render.sweep_snapshot_html(self._sweep)

    # --------------------------------------------------------------- sweep events
    def on_sweep_start(self, sweep: Any) -> None:
        self._sweep = sweep
        self._draw_sweep()

    def on_trial_start(self, sweep: Any, run: Any, params: dict[str, Any]) -> None:
        self._sweep, self._run = sweep, run
        self._running = {"number": _trial_number(run.name, len(sweep.records)), "name": run.name,
                         "params": dict(params)}
        self._last = 0.0  # a new trial's first step always draws
        self.chart.value = render.loss_chart([], [], total=run.total_steps)
        self.trial.value = self._trial_line("starting ...")
        self._draw_sweep()

    def on_trial_end(self, sweep: Any, record: dict[str, Any]) -> None:
        run = self._run
        if run is not None and run.name == record["name"] and run.history and record["status"] == "pruned":
            self._draw_run(run.history[-1], ended="pruned")  # its run ended "stopped" before the sweep said why
        self._sweep, self._running = sweep, None
        self._draw_sweep()

    def on_sweep_end(self, sweep: Any) -> None:
        from IPython.display import HTML

        self._sweep, self._running = sweep, None
        self.stop_button.disabled = True
        self.stop_button.description = sweep.status.capitalize()  # not "Stopping ..." forever
        self._draw_sweep()
        if self._handle is not None:
            self._handle.update(HTML(self.snapshot()))  # replaces the live widget in the same output
            self.widget.close()

    # --------------------------------------------------------------- the running trial's events
    def on_run_start(self, run: Any) -> None:
        self._run = run
        self.trial.value = self._trial_line("running")

    def on_step(self, run: Any, record: dict[str, Any]) -> None:
        self._run = run
        last_step = record["step"] >= run.total_steps
        now = time.monotonic()
        if now - self._last < self.min_interval and not last_step:
            return  # throttled: at most one redraw per min_interval
        self._last = now
        self._draw_run(record)

    def on_eval(self, run: Any, metrics: dict[str, Any]) -> None:
        self._run = run
        if run.history:
            self._draw_run(run.history[-1])

    def on_run_end(self, run: Any) -> None:
        self._end_run(run)

    def on_error(self, run: Any, error: BaseException) -> None:
        self._end_run(run)

    # --------------------------------------------------------------- drawing
    def _draw_sweep(self) -> None:
        sweep = self._sweep
        best = sweep.best.get("number") if sweep.best else None
        self.status.value = sweep_render.sweep_status_html(sweep, self._position())
        self.table.value = sweep_render.trials_table_html(sweep.records, sweep.params, sweep.optimize,
                                                          running=self._running, best_number=best)
        self.charts.value = sweep_render.charts_html(sweep)

    def _position(self) -> str:
        """'trial 3 of 12' while one runs; '12 of 12 trials' between trials and at the end."""
        done, planned = sweep_render.done_count(self._sweep.records), self._sweep.planned
        return f"trial {done + 1} of {planned}" if self._running is not None else f"{done} of {planned} trials"

    def _draw_run(self, record: dict[str, Any], ended: str | None = None) -> None:
        run = self._run
        self.renders += 1
        history = [r for r in run.history if "loss" in r]
        evals = [e for e in run.eval_history if "eval_loss" in e]
        self.chart.value = render.loss_chart([r["step"] for r in history], [r["loss"] for r in history],
                                             [e["step"] for e in evals], [e["eval_loss"] for e in evals],
                                             log_scale=self.log_scale, total=run.total_steps)
        self.trial.value = self._trial_line(render.progress_line(
            record["step"], run.total_steps, record.get("tokens_per_second", 0.0),
            record.get("elapsed_seconds", 0.0), ended))

    def _end_run(self, run: Any) -> None:
        self._run = run
        if run.history:
            self._draw_run(run.history[-1], ended=run.status)
        else:
            self.chart.value = render.loss_chart([], [], empty=render.ended_before_a_step(run.status))
            self.trial.value = self._trial_line(run.status)

    def _trial_line(self, detail: str) -> str:
        """'lr-sweep/3 · learning_rate=0.0002, lora_r=16 — step 12/60 · ...' above the running trial's chart."""
        params = (self._running or {}).get("params", {})
        shown = ", ".join(f"{k}={sweep_render.fmt(v)}" for k, v in params.items())
        name = self._run.name if self._run is not None else ""
        return f"<b>{html.escape(name)}</b> · {html.escape(shown)} — {html.escape(detail)}"

    def _on_stop(self, _button: Any) -> None:
        if self._sweep is not None:
            self._sweep.stop()  # thread-safe: the sweep ends after the running trial's current step
            self.stop_button.disabled = True
            self.stop_button.description = "Stopping ..."


def _trial_number(name: str, fallback: int) -> int:
    """The trial number from a trial run's name, '<sweep>/<number>'."""
    tail = name.rsplit("/", 1)[-1]
    return int(tail) if tail.isdigit() else fallback


# ------------------------------------------------------------------------------- the sweep's line
def show_sweep(sweep: Any) -> None:
    """Display `sweep` (IPython calls this for a cell's Sweep result; nbtune/magics registers it): its
    headline, with the trials table and snapshot once it ended. A sweep still running gets a `SweepLine`
    that keeps this display current, to its end and through later resumes; without a panel it also follows
    the running trial's steps (what a background sweep with --no-panel shows of its progress, in its own
    cell)."""
    from IPython import get_ipython
    from IPython.display import display

    if sweep.status != "running":
        display(_ended_bundle(sweep), raw=True)
        return
    if type(get_ipython()).__name__ != "ZMQInteractiveShell":  # a terminal prints each update as a new line
        display({"text/plain": sweep.headline()}, raw=True)
        return
    handle = display({"text/plain": sweep.headline()}, raw=True, display_id=True)
    if handle is not None:
        panel = any(isinstance(o, SweepPanel) for o in sweep.observers)
        sweep.observers.append(SweepLine(handle, steps=not panel, snapshot=not panel))


class SweepLine(NullObserver):
    """A sweep observer keeping one display (a `display_id` handle) at the sweep's headline: updated when a
    trial starts or ends and when the sweep ends; with `steps`, at most every `min_interval` seconds with the
    running trial's step; with `snapshot`, the ended sweep's table and charts under it. Updates go by the
    display's id, so they land in the cell that showed it, wherever the notebook is by then."""

    def __init__(self, handle: Any, *, steps: bool, snapshot: bool, min_interval: float = 0.5) -> None:
        self.handle, self.steps, self.snapshot, self.min_interval = handle, steps, snapshot, min_interval
        self._sweep: Any = None
        self._last = 0.0

    def on_sweep_start(self, sweep: Any) -> None:
        self._sweep = sweep
        self._show(sweep.headline())

    def on_trial_start(self, sweep: Any, run: Any, params: dict[str, Any]) -> None:
        self._sweep, self._last = sweep, 0.0
        self._show(f"{sweep.headline()} — {run.name} starting")

    def on_step(self, run: Any, record: dict[str, Any]) -> None:
        now = time.monotonic()
        if self._sweep is None or not self.steps or now - self._last < self.min_interval:
            return
        self._last = now
        loss = f", loss {record['loss']:.4f}" if record.get("loss") is not None else ""
        self._show(f"{self._sweep.headline()} — {run.name}: step {record['step']}/{run.total_steps}{loss}")

    def on_trial_end(self, sweep: Any, record: dict[str, Any]) -> None:
        self._show(sweep.headline())

    def on_sweep_end(self, sweep: Any) -> None:
        if self.snapshot:
            self.handle.update(_ended_bundle(sweep), raw=True)
        else:
            self._show(sweep.headline())

    def _show(self, text: str) -> None:
        self.handle.update({"text/plain": text}, raw=True)


def _ended_bundle(sweep: Any) -> dict[str, str]:
    """What an ended sweep shows: its repr (headline and trials) and, where HTML shows, its snapshot."""
    return {"text/plain": repr(sweep), "text/html": sweep_render.sweep_snapshot_html(sweep)}
