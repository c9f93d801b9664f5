"""The live panel: an observer of a run that draws loss, memory, progress, status and a Stop button, and,
with `sample_every`, the latest answers to the sample prompts under the chart.

Redraws are throttled to 4 per second whatever the step rate, and each is a few string operations
(see `render`), so the panel costs a negligible share of a training step. When the run ends, the
widget is replaced in place (same display id) by a static HTML snapshot that survives saving.

The Stop button can only be clicked while the kernel is free: Jupyter delivers widget clicks between
cells, never during one. So it appears for background runs (`%%finetune --background`); a run that
blocks the cell is stopped with the kernel's interrupt (the panel says so), which ends it just as
cleanly after the current step.
"""

from __future__ import annotations

import time
from typing import Any

from nbtune.engine.compute.memory import memory_split
from nbtune.engine.training.events import NullObserver
from nbtune.widgets import render


class LivePanel(NullObserver):
    """ipywidgets view of one run; `display()` it, then pass it as an observer."""

    def __init__(self, *, interactive_stop: bool, min_interval: float = 0.25, log_scale: bool = False) -> None:
        import ipywidgets as w

        self.min_interval, self.log_scale = min_interval, log_scale
        self.status = w.HTML("<i>starting ...</i>")
        self.chart = w.HTML(render.loss_chart([], []))
        self.memory = w.HTML(render.memory_html({}))
        self.rewards = w.HTML("")  # a preference run's reward margin and accuracy; empty for sft
        self.samples = w.HTML("")  # empty (no space taken) until the first answers come
        self.progress_bar = w.IntProgress(value=0, min=0, max=1, layout=w.Layout(width="420px"))
        self.progress = w.HTML("")
        self.stop_button = w.Button(description="Stop", icon="stop", button_style="danger",
                                    tooltip="End training after the current step; the adapter is kept.")
        hint = w.HTML("<small>to stop: interrupt the kernel (■ or I,I); the run keeps its adapter</small>")
        controls = self.stop_button if interactive_stop else hint
        self.widget = w.VBox([self.status, w.HBox([self.chart, self.rewards, self.memory]), self.samples,
                              w.HBox([self.progress_bar, controls]), self.progress])
        self.renders = 0
        self._last = 0.0
        self._run: Any = None
        self._split: dict[str, float] = {}
        self._peak = 0.0
        self._handle: Any = None
        self._samples: list[dict[str, Any]] = []  # what on_samples brought, for a run whose list is not kept
        self.stop_button.on_click(self._on_stop)

    # --------------------------------------------------------------- display
    def show(self) -> None:
        """Display the widget in the current cell, remembering where, for the final snapshot."""
        from IPython.display import display

        self._handle = display(self.widget, display_id=True)

    # --------------------------------------------------------------- events
    def on_run_start(self, run: Any) -> None:
        self._run = run
        self._split = memory_split(run.model) if run.model is not None else {}
        self.progress_bar.max = max(run.total_steps, 1)
        processes = getattr(getattr(run, "config", None), "num_processes", 1)
        detail = f"{processes} processes, rank 0 shown" if processes > 1 else ""
        self.status.value = render.status_html(run.name, run.method.name, "running", detail)

    def on_step(self, run: Any, record: dict[str, Any]) -> None:
        self._peak = max(self._peak, record.get("rss_mb", 0.0))
        last_step = record["step"] >= run.total_steps
        now = time.monotonic()
        if now - self._last < self.min_interval and not last_step:
            return  # throttled: at most one redraw per min_interval
        self._last = now
        self.draw(record)
        if last_step:  # the final evaluation and save can take a while: say so
            self.status.value = render.status_html(run.name, run.method.name, "running",
                                                   "training done; evaluating and saving ...")

    def on_eval(self, run: Any, metrics: dict[str, Any]) -> None:
        if run.history:
            self.draw(run.history[-1])

    def on_samples(self, run: Any, step: int, records: list[dict[str, Any]]) -> None:
        # Not throttled: answers come every `sample_every` steps, and each round is worth showing.
        self._samples.extend(records)
        kept = getattr(run, "samples", [])
        shown = kept if records and kept[-len(records):] == records else self._samples
        self.samples.value = render.samples_table(shown)

    def on_run_end(self, run: Any) -> None:
        self._finish(run)

    def on_error(self, run: Any, error: BaseException) -> None:
        self._finish(run)

    # --------------------------------------------------------------- drawing
    def draw(self, record: dict[str, Any], ended: str | None = None) -> None:
        run = self._run
        self.renders += 1
        self.chart.value = self._chart(run)
        self.rewards.value = render.rewards_chart(run)
        self.memory.value = render.memory_html(self._memory(record.get("rss_mb")))
        self.progress_bar.value = min(record["step"], self.progress_bar.max)
        self.progress.value = render.progress_line(record["step"], run.total_steps,
                                                   record.get("tokens_per_second", 0.0),
                                                   record.get("elapsed_seconds", 0.0), ended)

    def snapshot(self) -> str:
        return render.snapshot_html(self._run, self._memory(None), self.log_scale)

    def _finish(self, run: Any) -> None:
        self._run = run
        try:
            self.stop_button.disabled = True
            self.stop_button.description = run.status.capitalize()  # not "Stopping ..." forever
            self.status.value = render.status_html(run.name, run.method.name, run.status, run.error or "")
            if run.history:
                self.draw(run.history[-1], ended=run.status)
            else:
                self.chart.value = render.loss_chart([], [], empty=render.ended_before_a_step(run.status))
        finally:  # whatever failed above, the widget must not outlive the run (see `_leave_snapshot`)
            self._leave_snapshot(run)

    def _leave_snapshot(self, run: Any) -> None:
        """Replace the live widget in its output (same display id) by static HTML: a widget left there is saved
        without its state, and the reopened notebook shows "Error displaying widget: model not found" instead.
        A snapshot that fails to draw still leaves the status line, with why."""
        from IPython.display import HTML

        if self._handle is None:
            return
        try:
            snapshot = self.snapshot()
        except Exception as exc:
            snapshot = render.status_html(run.name, run.method.name, run.status,
                                          f"{run.error or ''} (the snapshot failed to draw: {exc!r})".strip())
        self._handle.update(HTML(snapshot))
        self.widget.close()

    def _chart(self, run: Any) -> str:
        history = [r for r in run.history if "loss" in r]
        evals = [e for e in run.eval_history if "eval_loss" in e]
        return render.loss_chart([r["step"] for r in history], [r["loss"] for r in history],
                                 [e["step"] for e in evals], [e["eval_loss"] for e in evals],
                                 log_scale=self.log_scale, total=run.total_steps)

    def _memory(self, rss: float | None) -> dict[str, Any]:
        from nbtune.engine.compute.memory import cuda_mb, rss_mb

        rss = rss if rss is not None else rss_mb()
        held = sum(self._split.values())
        cuda = cuda_mb()  # on a GPU the model, its gradients and activations live there, not in RSS
        used = cuda.get("cuda_allocated_mb", rss)
        return {"rss_mb": rss, "peak_rss_mb": max(self._peak, rss), **cuda, **self._split,
                "activations_mb": max(used - held, 0.0) if self._split else None}

    def _on_stop(self, _button: Any) -> None:
        if self._run is not None:
            self._run.stop()
            self.stop_button.disabled = True
            self.stop_button.description = "Stopping ..."
