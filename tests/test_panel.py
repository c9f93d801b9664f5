"""The live panel by its widget state and the comm messages it sends, and its pure SVG/HTML rendering."""

from __future__ import annotations

import math

import pytest

import nbtune
from nbtune.widgets import render

pytest.importorskip("ipywidgets")


class RecordingComm:
    """Stands in for a kernel comm (ipywidgets' DummyComm pattern): keeps every message a widget sends."""

    sent: list[dict] = []

    def __init__(self, *args, **kwargs):
        self.comm_id = kwargs.get("comm_id", "test")
        self.kernel = object()  # ipywidgets only sends when the comm has a kernel

    def publish_msg(self, msg_type, data=None, metadata=None, buffers=None, **keys):
        RecordingComm.sent.append({"type": msg_type, "data": data})

    def send(self, data=None, metadata=None, buffers=None):
        self.publish_msg("comm_msg", data=data)

    def open(self, *args, **kwargs):
        pass

    def close(self, *args, **kwargs):
        pass

    def on_msg(self, callback):
        pass

    def on_close(self, callback):
        pass


@pytest.fixture
def comms(monkeypatch):
    import comm

    RecordingComm.sent = []
    monkeypatch.setattr(comm, "create_comm", RecordingComm)
    return RecordingComm.sent


def _panel(interactive_stop=True, min_interval=0.25):
    from nbtune.widgets.panel import LivePanel

    return LivePanel(interactive_stop=interactive_stop, min_interval=min_interval)


def test_the_panel_draws_a_real_run(llama_base, demo_rows, comms):
    panel = _panel(min_interval=0.0)
    run = nbtune.finetune(data=demo_rows, eval_split=0.25, eval_steps=2, base=llama_base, observers=[panel],
                          steps=4, batch_size=4, metric="none", save=False)
    assert panel.chart.value.count("<polyline") == 2  # raw and smoothed train loss
    assert panel.chart.value.count("<circle") == len(run.eval_history)
    assert panel.progress_bar.value == panel.progress_bar.max == 4
    assert "step 4/4" in panel.progress.value and "tok/s" in panel.progress.value
    assert "finished" in panel.status.value and panel.stop_button.disabled
    assert "RSS now" in panel.memory.value and "base weights" in panel.memory.value
    updates = [m for m in comms if m["type"] == "comm_msg" and m["data"].get("method") == "update"]
    assert any("value" in m["data"]["state"] and "<svg" in str(m["data"]["state"]["value"]) for m in updates)


def test_redraws_are_throttled_but_the_last_step_always_shows(comms):
    panel = _panel(min_interval=10.0)  # far longer than the loop below

    class FakeRun:
        name, total_steps, history, eval_history, model = "r", 100, [], [], None
        method = nbtune.methods("lora")

    run = FakeRun()
    panel.on_run_start(run)
    for step in range(1, 101):
        record = {"step": step, "loss": 1.0 / step, "rss_mb": 100.0, "tokens_per_second": 10.0,
                  "elapsed_seconds": step * 0.01}
        run.history.append(record)
        panel.on_step(run, record)
    assert panel.renders == 2  # the first step, then only the last
    assert panel.progress_bar.value == 100


def test_the_memory_split_is_sane(llama_base, demo_rows, comms):
    panel = _panel()
    nbtune.finetune(data=demo_rows, base=llama_base, observers=[panel], steps=2, batch_size=4, metric="none",
                    save=False)
    memory = panel._memory(None)
    assert memory["rss_mb"] > 0 and memory["peak_rss_mb"] >= memory["rss_mb"] * 0.5
    trainable = panel._run.metrics["trainable_params"]
    assert memory["optimizer_mb"] == pytest.approx(8 * trainable / 2**20)
    assert memory["weights_mb"] > memory["trainable_mb"] > 0


def test_stop_clicked_while_training_ends_the_run_after_that_step(llama_base, demo_rows, comms):
    panel = _panel()

    class ClickAtTwo(nbtune.engine.training.events.NullObserver):
        def on_step(self, run, record):
            if record["step"] == 2:
                panel.stop_button.click()

    run = nbtune.finetune(data=demo_rows, base=llama_base, observers=[panel, ClickAtTwo()], steps=50,
                          batch_size=4, metric="none", save=False)
    assert run.status == "stopped" and len(run.history) == 2
    assert "stopped" in panel.status.value
    assert "stopped" in panel.snapshot() and "step 2/50" in panel.snapshot()  # how far it got, after the widget
    assert panel.stop_button.description == "Stopped" and panel.progress.value.endswith("elapsed · stopped")


def test_a_run_that_fails_before_its_first_step_says_so_in_the_chart(llama_base, demo_rows, comms):
    panel = _panel()
    with pytest.raises(nbtune.MethodError):
        nbtune.finetune(data=demo_rows, base=llama_base, observers=[panel], target_modules=["no_such_layer"],
                        steps=2, batch_size=4, metric="none", save=False)
    assert "failed before its first step" in panel.chart.value
    assert "failed before its first step" in panel.snapshot()


def test_a_blocking_run_shows_how_to_stop_instead_of_a_dead_button(comms):
    panel = _panel(interactive_stop=False)
    texts = [str(getattr(child, "value", "")) for box in panel.widget.children
             for child in getattr(box, "children", [])]
    assert any("interrupt the kernel" in t for t in texts)
    assert panel.stop_button not in [c for box in panel.widget.children for c in getattr(box, "children", [])]


def test_the_snapshot_is_static_html_with_chart_and_metrics(llama_base, demo_rows, comms):
    panel = _panel()
    run = nbtune.finetune(data=demo_rows, base=llama_base, observers=[panel], steps=3, batch_size=4,
                          metric="none", save=False)
    html = panel.snapshot()
    assert "<svg" in html and "trainable_params" in html and run.name in html and "finished" in html
    assert "<script" not in html  # shows in nbconvert, GitHub and saved notebooks without a kernel


def test_smoothing_and_the_chart_handle_odd_values():
    assert render.smooth([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])
    chart = render.loss_chart([1, 2, 3], [2.0, math.nan, 1.0])
    assert chart.count("<polyline") == 2 and "nan" not in chart
    assert "waiting" in render.loss_chart([], [])
    log = render.loss_chart([1, 2], [100.0, 0.01], log_scale=True)
    assert "(log)" in log


def test_the_progress_line_has_eta():
    line = render.progress_line(10, 40, 250.0, 30.0)
    assert line == "step 10/40 · 250 tok/s · 0:30 elapsed · ETA 1:30"


def test_the_memory_table_shows_small_amounts_instead_of_zero():
    table = render.memory_html({"rss_mb": 812.4, "peak_rss_mb": 1534.6, "trainable_mb": 0.06, "optimizer_mb": 0.12,
                                "weights_mb": 0.0, "activations_mb": None})
    assert "812 MB" in table and "1,535 MB" in table
    assert "0.06 MB" in table and "0.12 MB" in table  # a tiny adapter is small, not nothing
    assert "<td>base weights</td><td style='text-align:right'>0 MB</td>" in table


# ---------------------------------------------------------------------------- what the tables and charts show
def _polyline_ys(svg: str) -> list[float]:
    import re

    points = re.search(r'<polyline[^>]*points="([^"]*)"', svg).group(1).split()
    return [float(p.split(",")[1]) for p in points]


def test_a_flat_loss_sits_mid_chart_between_two_different_labels():
    import re

    chart = render.loss_chart([1, 2, 3], [0.127, 0.127, 0.127], total=3)
    middle = 8 + (render.HEIGHT - render.PAD - 8) / 2
    assert all(abs(y - middle) < 1 for y in _polyline_ys(chart))  # not on the bottom edge
    top, bottom = re.findall(r'font-size="10">([-\d.e]+)</text>', chart)[:2]
    assert float(top) > 0.127 > float(bottom)  # "0.14" over "0.114", not 0.127 twice or a made-up 1.127


def test_a_single_step_is_drawn_as_a_dot():
    chart = render.loss_chart([1], [2.5], total=1)
    assert "nbtune-only-step" in chart  # a one-point polyline draws nothing
    assert "step 1" in chart and "2.75" in chart and "2.25" in chart


def test_the_comparison_draws_a_flat_or_one_step_curve_mid_chart():
    from nbtune.widgets.compare_view import curves_svg

    svg = curves_svg({"a": {"step": [1], "loss": [0.5], "elapsed_seconds": [0.1]}}, "step")
    assert "<circle" in svg and "0.55" in svg and "0.45" in svg
    middle = 8 + (render.HEIGHT - render.PAD - 8) / 2
    assert abs(_polyline_ys(svg)[0] - middle) < 1


def _sample(step, prompt, answer):
    return {"step": step, "prompt": prompt, "answer": answer}


def test_the_samples_table_has_no_empty_before_column_and_padded_headers():
    first = render.samples_table([_sample(2, "p1", "a"), _sample(2, "p2", "b")])
    assert "<th" in first and ">before</th>" not in first  # nothing came before the first round
    assert first.count("<th style='padding:") == 3 and first.count("<td style='padding:") == 6
    later = render.samples_table([_sample(2, "p1", "a"), _sample(4, "p1", "c"), _sample(4, "p2", "d")])
    assert ">before</th>" in later and "step 2:</span> a" in later
    assert later.count("<td style='padding:") == 8 and ">-</td>" in later  # p2 has no earlier answer: '-'


def test_short_answers_and_references_never_break_in_the_predictions_table():
    from nbtune.engine.evaluation.predictions import Predictions
    from nbtune.widgets.predictions_view import predictions_html

    long = "the answer is probably a date in April of the year 2046, the seventh"
    rows = [{"row": 0, "prompt": "When? " * 20, "reference": "2046-04-07", "base": "2046-04-0", "tuned": "2046-04-07",
             "exact_match": 1.0, "base_exact_match": 0.0},
            {"row": 1, "prompt": "p", "reference": "2046-04-07", "base": None, "tuned": long, "exact_match": 0.0,
             "base_exact_match": 0.0}]
    page = predictions_html(Predictions(rows, ["exact_match"], run="r", best={"exact_match": 1.0}))
    cells = page.split("<td style='")[1:]

    def style_of(text):
        return next(c.split("'")[0] for c in cells if text in c.split("</td>")[0])

    assert "white-space:pre;" in style_of(">2046-04-07<") + ";"  # the reference, one line
    assert "white-space:pre;" in style_of("2046-04-0</span>") + ";"  # the base answer, one line
    assert "white-space:pre-wrap" in style_of("When? When?")  # a long prompt wraps
    assert "white-space:pre-wrap" in style_of("the answer is probably")  # so does a long answer


class RecordingHandle:
    """Stands in for a display handle: what the panel's output was last updated to."""

    def __init__(self):
        self.shown = None

    def update(self, obj, **kwargs):
        self.shown = obj


def _ended_run(status="finished"):
    class EndedRun:
        name, total_steps, eval_history, model, samples, metrics, error = "r", 2, [], None, [], {}, None
        method = nbtune.methods("lora")
        history = [{"step": 1, "loss": 2.0, "rss_mb": 100.0}, {"step": 2, "loss": 1.5, "rss_mb": 100.0}]

    run = EndedRun()
    run.status = status
    return run


@pytest.mark.parametrize("broken", ["progress_line", "rewards_chart"])
def test_the_live_widget_is_replaced_even_when_drawing_the_end_fails(comms, monkeypatch, broken):
    # a widget left in the output is saved without its state: reopened, "Error displaying widget"
    panel, run, handle = _panel(), _ended_run(), RecordingHandle()
    panel._handle = handle
    panel.on_run_start(run)

    def fail(*args, **kwargs):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(render, broken, fail)
    with pytest.raises(RuntimeError):
        panel.on_run_end(run)
    assert handle.shown is not None and "finished" in handle.shown.data  # static HTML, not the widget
    assert panel.widget.comm is None  # closed
    if broken == "rewards_chart":  # the snapshot itself could not draw: the status line says why
        assert "the snapshot failed to draw" in handle.shown.data
