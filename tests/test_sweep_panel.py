"""The live sweep panel, driven by a fake sweep and fake trial runs (no engine, no kernel), and its pure
HTML/SVG rendering."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import pytest

from nbtune.widgets import sweep_render
from nbtune.widgets.sweep_render import best_so_far_svg, metric_by_param_svgs, trials_table_html

pytest.importorskip("ipywidgets")


@dataclass
class FakeSweep:
    """The attributes the sweep engine promises, and nothing else."""

    name: str = "lr-sweep"
    optimize: str = "eval_loss"
    direction: str = "minimize"
    records: list[dict[str, Any]] = field(default_factory=list)
    planned: int = 4
    params: list[str] = field(default_factory=lambda: ["learning_rate", "lora_r"])
    status: str = "running"
    stops: int = 0

    @property
    def best(self) -> dict[str, Any] | None:
        done = [r for r in self.records if r["status"] == "finished" and r["value"] is not None]
        pick = min if self.direction == "minimize" else max
        return pick(done, key=lambda r: r["value"]) if done else None

    def stop(self) -> None:
        self.stops += 1


@dataclass
class FakeMethod:
    name: str = "lora"


@dataclass
class FakeRun:
    name: str
    total_steps: int = 10
    history: list[dict[str, Any]] = field(default_factory=list)
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    method: FakeMethod = field(default_factory=FakeMethod)
    status: str = "pending"


def record(number, value, status="finished", lr=1e-4, r=8, error=None):
    return {"number": number, "name": f"lr-sweep/{number}", "params": {"learning_rate": lr, "lora_r": r},
            "value": value, "status": status, "error": error, "steps": 10, "seconds": 3.25}


RECORDS = [record(0, 1.2, lr=1e-5, r=8), record(1, 0.9, lr=3e-4, r=16), record(2, None, "pruned", lr=1e-3, r=8),
           record(3, None, "failed", lr=5e-3, r=32, error="CUDA out of memory"), record(4, 0.7, lr=2e-4, r=16),
           record(5, 1.0, lr=5e-5, r=32)]


class FakeHandle:
    def __init__(self):
        self.updates = []

    def update(self, obj, raw=False):
        self.updates.append(obj)


@pytest.fixture
def shown(monkeypatch):
    """Where `show()` displays: a handle that records what replaced the widget."""
    import IPython.display

    handle = FakeHandle()
    monkeypatch.setattr(IPython.display, "display", lambda *args, **kwargs: handle)
    return handle


def _panel(interactive_stop=True, min_interval=0.0):
    from nbtune.widgets.sweep_panel import SweepPanel

    return SweepPanel(interactive_stop=interactive_stop, min_interval=min_interval)


def _step(panel, run, step, loss=1.0):
    entry = {"step": step, "loss": loss, "elapsed_seconds": step * 0.5, "tokens_per_second": 100.0,
             "rss_mb": 500.0}
    run.history.append(entry)
    panel.on_step(run, entry)


def _points(svg, css="best-so-far"):
    coords = re.search(rf'class="{css}"[^>]*points="([^"]*)"', svg).group(1)
    return [tuple(float(c) for c in pair.split(",")) for pair in coords.split()]


# --------------------------------------------------------------------------- rendering
def test_the_table_lists_every_trial_with_its_params_value_and_status():
    table = trials_table_html(RECORDS, ["learning_rate", "lora_r"], "eval_loss", best_number=4)
    rows = re.findall(r"<tr.*?</tr>", table)
    assert len(rows) == 1 + len(RECORDS)
    assert "<th>learning_rate</th>" in rows[0] and "<th>eval_loss</th>" in rows[0]
    assert "<td>0.0003</td>" in rows[2] and "<td>16</td>" in rows[2] and "<td>0.9</td>" in rows[2]
    assert ">pruned<" in rows[3] and ">failed<" in rows[4] and "CUDA out of memory" in rows[4]  # why, as a tooltip
    assert "<td>-</td>" in rows[3]  # no value for a pruned trial
    best = [row for row in rows if "class='best'" in row]
    assert len(best) == 1 and "<td>0.7</td>" in best[0] and "★" in best[0]


def test_the_running_trial_is_a_row_marked_running():
    running = {"number": 6, "name": "lr-sweep/6", "params": {"learning_rate": 1e-4, "lora_r": 8}}
    table = trials_table_html(RECORDS[:2], ["learning_rate", "lora_r"], "eval_loss", running=running)
    last = re.findall(r"<tr.*?</tr>", table)[-1]
    assert "<td>6</td>" in last and ">running<" in last
    assert "no trial yet" in trials_table_html([], ["x"], "eval_loss")


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_the_best_so_far_line_only_improves(direction):
    records = [record(n, v) for n, v in enumerate([1.0, 0.8, 1.3, 0.5, 1.1])]
    records += [{**r, "number": n} for n, r in zip((5, 6), RECORDS[2:4], strict=True)]  # pruned, failed
    svg = best_so_far_svg(records, direction, "eval_loss")
    assert svg.count('class="trial finished"') == 5  # one point per finished trial
    assert 'class="trial failed"' not in svg and 'class="trial pruned"' not in svg  # no value: nothing to place
    ys = [y for _, y in _points(svg)]
    xs = [x for x, _ in _points(svg)]
    assert xs == sorted(xs)
    # SVG y grows downward: a falling loss is a growing y
    assert ys == (sorted(ys) if direction == "minimize" else sorted(ys, reverse=True))
    assert len(set(ys)) == (3 if direction == "minimize" else 2)  # 1.0 -> 0.8 -> 0.5; or 1.0 -> 1.3


def test_a_pruned_trial_with_a_value_is_grey_and_off_the_best_line():
    records = [record(0, 1.0), record(1, 0.2, "pruned")]
    svg = best_so_far_svg(records, "minimize")
    assert svg.count('class="trial pruned"') == 1 and sweep_render.OTHER in svg
    assert {y for _, y in _points(svg)} == {_points(svg)[0][1]}  # flat: 0.2 is not a finished trial's best
    assert "no finished trial yet" in best_so_far_svg([record(0, None, "failed")], "minimize")


def test_one_scatter_per_param_with_categories_labelled_and_wide_ranges_on_a_log_axis():
    records = [{**r, "params": {**r["params"], "scheduler": s}} for r, s in
               zip(RECORDS, ["cosine", "linear", "cosine", "constant", "linear", "cosine"], strict=True)]
    svgs = metric_by_param_svgs(records, ["learning_rate", "lora_r", "scheduler"], "eval_loss")
    assert len(svgs) == 3
    assert "learning_rate (log)" in svgs[0]  # 1e-5 .. 5e-3 spans 500x
    assert [m for m in re.findall(r'class="category">([^<]*)<', svgs[1])] == ["8", "16", "32"]
    assert re.findall(r'class="category">([^<]*)<', svgs[2]) == ["cosine", "linear", "constant"]
    assert all(svg.count('class="trial finished"') == 4 for svg in svgs)
    narrow = metric_by_param_svgs([record(0, 1.0, lr=1e-4), record(1, 0.9, lr=3e-4)], ["learning_rate"], "x")
    assert "(log)" not in narrow[0] and 'class="category"' not in narrow[0]


def test_everything_is_escaped():
    sweep = FakeSweep(name="<script>x</script>", optimize="<i>loss</i>", params=["<p>"],
                      records=[{**record(0, 1.0), "params": {"<p>": "<b>"}}])
    html = sweep_render.sweep_snapshot_html(sweep)
    assert "<td>&lt;b&gt;</td>" in html and "&lt;b&gt;</text>" in html  # in the table and the scatter's label
    assert "<script" not in html and "&lt;script&gt;" in html
    assert "<i>loss" not in html and "<p>" not in html


# --------------------------------------------------------------------------- the panel
def test_the_panel_follows_a_sweep_and_leaves_a_static_snapshot(shown):
    sweep = FakeSweep()
    panel = _panel()
    panel.show()
    panel.on_sweep_start(sweep)
    assert "0 of 4 trials" in panel.status.value and "no trial yet" in panel.table.value
    for number, (value, status) in enumerate([(1.0, "finished"), (None, "pruned"), (0.8, "finished")]):
        run = FakeRun(f"lr-sweep/{number}")
        panel.on_trial_start(sweep, run, {"learning_rate": 1e-4 * (number + 1), "lora_r": 8})
        assert f"trial {number + 1} of 4" in panel.status.value and ">running<" in panel.table.value
        panel.on_run_start(run)
        for step in range(1, 4):
            _step(panel, run, step, loss=2.0 / step)
        run.status = "stopped" if status == "pruned" else "finished"
        panel.on_run_end(run)
        sweep.records.append({**record(number, value, status), "params": {"learning_rate": 1e-4 * (number + 1),
                                                                          "lora_r": 8}})
        panel.on_trial_end(sweep, sweep.records[-1])
        assert ">running<" not in panel.table.value and f"{number + 1} of 4 trials" in panel.status.value
    assert "best 0.8 (trial 2)" in panel.status.value
    assert panel.charts.value.count("<svg") == 3  # best so far, and one per param
    sweep.status = "finished"
    panel.on_sweep_end(sweep)
    assert len(shown.updates) == 1
    snapshot = shown.updates[0].data
    assert "<table class='nbtune-trials'" in snapshot and snapshot.count("<svg") == 3
    assert "lr-sweep" in snapshot and "3 of 4 trials" in snapshot and "<script" not in snapshot
    assert panel.stop_button.disabled and panel.stop_button.description == "Finished"


def test_the_running_trials_loss_chart_gains_points_with_each_step():
    sweep, run = FakeSweep(), FakeRun("lr-sweep/0", total_steps=5)
    panel = _panel(min_interval=0.0)
    panel.on_sweep_start(sweep)
    panel.on_trial_start(sweep, run, {"learning_rate": 2e-4, "lora_r": 16})
    assert "waiting" in panel.chart.value and "learning_rate=0.0002" in panel.trial.value
    _step(panel, run, 1)
    _step(panel, run, 2, 0.5)
    first = _points(panel.chart.value.replace('<polyline fill="none" stroke="#08519c"', '<polyline class="s"'), "s")
    _step(panel, run, 3, 0.4)
    later = _points(panel.chart.value.replace('<polyline fill="none" stroke="#08519c"', '<polyline class="s"'), "s")
    assert len(later) == len(first) + 1 == 3
    assert "step 3/5" in panel.trial.value
    run.eval_history.append({"step": 3, "eval_loss": 0.6})
    panel.on_eval(run, {"eval_loss": 0.6})
    assert panel.chart.value.count("<circle") == 1 and panel.renders == 4


def test_redraws_are_throttled_but_the_last_step_always_shows():
    sweep, run = FakeSweep(), FakeRun("lr-sweep/0", total_steps=50)
    panel = _panel(min_interval=10.0)  # far longer than the loop below
    panel.on_sweep_start(sweep)
    panel.on_trial_start(sweep, run, {"learning_rate": 2e-4, "lora_r": 16})
    for step in range(1, 51):
        _step(panel, run, step)
    assert panel.renders == 2 and "step 50/50" in panel.trial.value  # the first step, then only the last
    second = FakeRun("lr-sweep/1", total_steps=50)
    panel.on_trial_start(sweep, second, {"learning_rate": 1e-4, "lora_r": 8})
    _step(panel, second, 1)
    assert panel.renders == 3  # a new trial's first step draws at once


def test_stop_ends_the_sweep_and_says_so():
    sweep = FakeSweep()
    panel = _panel(interactive_stop=True)
    panel.on_sweep_start(sweep)
    panel.stop_button.click()
    assert sweep.stops == 1
    assert panel.stop_button.disabled and panel.stop_button.description == "Stopping ..."
    sweep.status = "stopped"
    panel.on_sweep_end(sweep)  # not shown: no handle to update, and no error
    assert panel.stop_button.description == "Stopped" and "stopped" in panel.status.value


def test_a_blocking_sweep_shows_how_to_stop_instead_of_a_dead_button():
    panel = _panel(interactive_stop=False)
    assert panel.stop_button not in panel.widget.children
    assert any("interrupt the kernel" in str(getattr(c, "value", "")) for c in panel.widget.children)


def test_a_trial_that_fails_before_its_first_step_says_so():
    sweep, run = FakeSweep(), FakeRun("lr-sweep/0")
    panel = _panel()
    panel.on_sweep_start(sweep)
    panel.on_trial_start(sweep, run, {"learning_rate": 2e-4, "lora_r": 16})
    run.status = "failed"
    panel.on_error(run, RuntimeError("boom"))
    assert "failed before its first step" in panel.chart.value and "failed" in panel.trial.value


# ------------------------------------------------------------------ one point, a flat series (issue 29 item 13)
def _labels(svg):
    """(the value axis' top label, its bottom label, the other axis' tick labels) of a chart."""
    texts = re.findall(r"<text([^>]*)>([^<]*)</text>", svg)
    high, low = (float(text) for attrs, text in texts if ' x="2" ' in attrs)
    return high, low, [text for attrs, text in texts if ' x="2" ' not in attrs and " by " not in text]


def test_a_one_point_chart_has_a_value_range_and_one_trial_tick():
    """The first trial of a sweep drew an axis from 0.127 to 0.127 and 'trial 0 ... trial 0'."""
    svg = best_so_far_svg([record(0, 0.127)], "minimize", "eval_loss")
    high, low, ticks = _labels(svg)
    assert low < 0.127 < high and ticks == ["trial 0"]
    [(x, _)] = _points(svg)
    assert f'x="{x:.1f}"' in re.search(r"<text[^>]*>trial 0<", svg).group(0)  # under its point
    [scatter] = metric_by_param_svgs([record(0, 0.127, lr=3e-4)], ["learning_rate"], "eval_loss")
    high, low, ticks = _labels(scatter)
    assert low < 0.127 < high and ticks == ["0.0003"]


def test_a_flat_series_gets_a_padded_range_and_a_spread_one_keeps_its_own():
    flat = [record(n, 0.5) for n in range(3)]
    high, low, ticks = _labels(best_so_far_svg(flat, "minimize"))
    assert (low, high) == (0.475, 0.525) and ticks == ["trial 0", "trial 2"]
    assert sweep_render.padded([0.0]) == (-0.05, 0.05) and sweep_render.padded([1.0, 2.0]) == (1.0, 2.0)
    high, low, _ = _labels(best_so_far_svg([record(0, 1.0), record(1, 2.0)], "minimize"))
    assert (low, high) == (1.0, 2.0)


# ------------------------------------------------------------------ the sweep's own line (issue 29 item 12)
@dataclass
class LineSweep(FakeSweep):
    observers: list = field(default_factory=list)

    def headline(self):
        return f"sweep {self.name!r}: {len(self.records)} of {self.planned} trials, {self.status}"

    def __repr__(self):
        return self.headline()


@pytest.fixture
def displayed(monkeypatch):
    """What show_sweep displays: (bundle, display_id) per call, and the handle's updates."""
    import IPython.display

    calls, handle = [], FakeHandle()

    def display(obj, raw=False, display_id=None):
        calls.append((obj, display_id))
        return handle if display_id else None

    monkeypatch.setattr(IPython.display, "display", display)
    monkeypatch.setattr(IPython, "get_ipython", lambda: ZMQInteractiveShell())
    return calls, handle


class ZMQInteractiveShell:
    """Stands for a notebook's kernel (by its class name, as nbtune tells one)."""


def test_a_running_sweeps_line_follows_it_to_its_end_and_through_a_resume(displayed):
    """A --background sweep's line stayed "0 of 4 trials, running" after it finished, and after a resume."""
    from nbtune.widgets.sweep_panel import SweepLine, show_sweep

    calls, handle = displayed
    sweep = LineSweep(observers=[])
    show_sweep(sweep)
    [(bundle, display_id)] = calls
    assert bundle == {"text/plain": "sweep 'lr-sweep': 0 of 4 trials, running"} and display_id is True
    [line] = sweep.observers
    assert isinstance(line, SweepLine) and line.steps and line.snapshot  # no panel: it is the progress too
    run = FakeRun("lr-sweep/0", total_steps=10)
    line.on_trial_start(sweep, run, {})
    line.on_step(run, {"step": 3, "loss": 1.25})
    assert handle.updates[-1] == {"text/plain": "sweep 'lr-sweep': 0 of 4 trials, running — lr-sweep/0: step 3/10, "
                                                "loss 1.2500"}
    sweep.records.append(record(0, 0.9))
    line.on_trial_end(sweep, sweep.records[-1])
    sweep.status = "stopped"
    line.on_sweep_end(sweep)
    assert handle.updates[-1]["text/plain"] == "sweep 'lr-sweep': 1 of 4 trials, stopped"
    assert "nbtune-sweep-snapshot" in handle.updates[-1]["text/html"]
    sweep.status = "running"  # resumed: the same line goes on
    line.on_sweep_start(sweep)
    sweep.records += [record(n, 1.0) for n in (1, 2, 3)]
    sweep.status = "finished"
    line.on_sweep_end(sweep)
    assert handle.updates[-1]["text/plain"] == "sweep 'lr-sweep': 4 of 4 trials, finished"


def test_under_a_panel_the_line_is_the_headline_alone_and_an_ended_sweep_is_shown_whole(displayed):
    from nbtune.widgets.sweep_panel import show_sweep

    calls, handle = displayed
    panel = _panel()
    sweep = LineSweep(observers=[panel])
    show_sweep(sweep)
    line = sweep.observers[-1]
    assert not line.steps and not line.snapshot  # the panel shows the steps and leaves the snapshot
    line.on_step(FakeRun("lr-sweep/0"), {"step": 1, "loss": 1.0})
    assert handle.updates == []
    sweep.status = "finished"
    line.on_sweep_end(sweep)
    assert handle.updates[-1] == {"text/plain": "sweep 'lr-sweep': 0 of 4 trials, finished"}
    show_sweep(sweep)  # an ended sweep: shown once, whole, and not followed
    bundle, display_id = calls[-1]
    assert display_id is None and "nbtune-sweep-snapshot" in bundle["text/html"] and len(sweep.observers) == 2


def test_a_pruned_trials_line_says_pruned_not_stopped():
    """Issue 29 item 7: its run ends "stopped" (the pruner stopped it); the sweep then tells it pruned."""
    sweep, run = FakeSweep(), FakeRun("lr-sweep/0", total_steps=10)
    panel = _panel()
    panel.on_sweep_start(sweep)
    panel.on_trial_start(sweep, run, {"learning_rate": 2e-4, "lora_r": 16})
    _step(panel, run, 2)
    run.status = "stopped"
    panel.on_run_end(run)
    assert "stopped" in panel.trial.value
    sweep.records.append(record(0, 1.1, "pruned"))
    panel.on_trial_end(sweep, sweep.records[-1])
    assert "pruned" in panel.trial.value and "stopped" not in panel.trial.value and "step 2/10" in panel.trial.value


def test_a_terminal_gets_the_line_once_not_an_update_per_step(displayed, monkeypatch):
    import IPython

    from nbtune.widgets.sweep_panel import show_sweep

    calls, _ = displayed
    monkeypatch.setattr(IPython, "get_ipython", lambda: None)
    sweep = LineSweep(observers=[])
    show_sweep(sweep)
    assert calls == [({"text/plain": "sweep 'lr-sweep': 0 of 4 trials, running"}, None)] and sweep.observers == []
