"""Pure rendering of a hyperparameter sweep to HTML/SVG: the trials table, the best-so-far chart, the
optimised metric against each parameter, and the static snapshot left in the cell when the sweep ends.

Like `render` for a single run: no widget code, so the live `SweepPanel` and the saved notebook show the
same strings. A trial is the plain dict the sweep engine records::

    {"number": 3, "name": "lr-sweep/3", "params": {"learning_rate": 2e-4, "lora_r": 16},
     "value": 0.812, "status": "finished", "error": None, "steps": 60, "seconds": 41.2}

    >>> trials_table_html(sweep.records, sweep.params, sweep.optimize, best_number=sweep.best["number"])
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from typing import Any

from nbtune.widgets.render import HEIGHT, WIDTH

STATUS_COLOURS = {"running": "#08519c", "finished": "#238b45", "pruned": "#888888", "stopped": "#d94801",
                  "failed": "#cb181d"}
POINT, OTHER, BEST_LINE = "#08519c", "#bbbbbb", "#e6550d"
SMALL_WIDTH, SMALL_HEIGHT = 210, 150
LOG_SPAN = 20.0  # numeric values spanning more than this factor get a log axis (learning rates, weight decay)
INSET = 7  # pixels between the axes and the outermost points, so none is cut in half
MAX_LEVELS = 6  # integer params with at most this many distinct values are shown as categories (lora_r)


# --------------------------------------------------------------------------- the table
def trials_table_html(records: Sequence[dict[str, Any]], params: Sequence[str], metric: str,
                      running: dict[str, Any] | None = None, best_number: int | None = None) -> str:
    """One row per trial: number, status, each parameter, the metric optimised, steps and seconds. `running` (a
    partial record: number, name, params) adds the trial in progress; the `best_number` row is highlighted."""
    rows = [_row(r, params, r.get("number") == best_number) for r in records]
    if running is not None:
        rows.append(_row({**running, "status": "running"}, params, False))
    if not rows:
        return "<p class='nbtune-trials'><i>no trial yet</i></p>"
    head = "".join(f"<th>{html.escape(name)}</th>" for name in ["trial", "status", *params, metric,
                                                                 "steps", "seconds"])
    return (f"<table class='nbtune-trials' style='text-align:right'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _row(record: dict[str, Any], params: Sequence[str], best: bool) -> str:
    status = str(record.get("status", ""))
    colour = STATUS_COLOURS.get(status, "#555")
    tip = f" title='{html.escape(str(record['error']), quote=True)}'" if record.get("error") else ""
    number = html.escape(str(record.get("number", "?"))) + (" ★" if best else "")
    cells = [f"<td>{number}</td>", f"<td style='color:{colour}'{tip}><b>{html.escape(status)}</b></td>"]
    cells += [f"<td>{html.escape(fmt(record.get('params', {}).get(p)))}</td>" for p in params]
    seconds = record.get("seconds")
    cells += [f"<td>{html.escape(fmt(record.get('value')))}</td>", f"<td>{html.escape(fmt(record.get('steps')))}</td>",
              f"<td>{'-' if seconds is None else f'{seconds:.1f}'}</td>"]
    style = " class='best' style='background:#fff3b0;font-weight:bold'" if best else ""
    return f"<tr{style}>{''.join(cells)}</tr>"


def fmt(value: Any) -> str:
    """'-' for nothing, floats to 4 significant digits (2e-04 as 0.0002), anything else as `str` (unescaped)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# --------------------------------------------------------------------------- charts
def best_so_far_svg(records: Sequence[dict[str, Any]], direction: str, metric: str = "metric") -> str:
    """Each trial's metric by trial number (finished trials in colour, pruned or stopped ones grey, failed
    ones absent) and the best-so-far step line over the finished trials."""
    shown = [r for r in records if _finite(r.get("value")) and r.get("status") != "failed"]
    if not shown:
        return _svg(WIDTH, HEIGHT, _note(WIDTH, HEIGHT, "no finished trial yet"))
    left, right, top, bottom = 44, WIDTH - 12, 10, HEIGHT - 30
    x = _linear([r["number"] for r in records], left + INSET, right - INSET)
    low, high = padded([r["value"] for r in shown])
    y = _linear([low, high], bottom - INSET, top + INSET)
    parts = [_axes(left, right, top, bottom)]
    line = _best_line(records, direction)
    if line:
        coords = " ".join(f"{x(n):.1f},{y(v):.1f}" for n, v in line)
        parts.append(f'<polyline class="best-so-far" fill="none" stroke="{BEST_LINE}" stroke-width="2" '
                     f'points="{coords}"/>')
    parts += [_point(x(r["number"]), y(r["value"]), r, f"trial {r['number']}: {fmt(r['value'])}") for r in shown]
    if line:  # ring the best trial's point: where the line ends up
        best = next(r for r in shown if r.get("status") == "finished" and r["value"] == line[-1][1])
        parts.append(f'<circle class="best" cx="{x(best["number"]):.1f}" cy="{y(best["value"]):.1f}" r="6.5" '
                     f'fill="none" stroke="{BEST_LINE}" stroke-width="1.5"/>')
    numbers = [r["number"] for r in records]
    if len(set(numbers)) == 1:  # one trial: one tick, under its point ("trial 0 ... trial 0" said nothing)
        ticks = (f'<text class="tick" x="{x(numbers[0]):.1f}" y="{HEIGHT - 16}" font-size="10" '
                 f'text-anchor="middle">trial {numbers[0]}</text>')
    else:
        ticks = (f'<text class="tick" x="{left}" y="{HEIGHT - 16}" font-size="10">trial {min(numbers)}</text>'
                 f'<text class="tick" x="{right}" y="{HEIGHT - 16}" font-size="10" text-anchor="end">'
                 f'trial {max(numbers)}</text>')
    parts.append(f'<text class="high" x="2" y="{top + 6}" font-size="10">{fmt(float(high))}</text>'
                 f'<text class="low" x="2" y="{bottom}" font-size="10">{fmt(float(low))}</text>{ticks}'
                 f'<text x="{left}" y="{HEIGHT - 3}" font-size="10">{html.escape(metric)} by trial · '
                 f'best so far ({html.escape(direction)})</text>')
    return _svg(WIDTH, HEIGHT, "".join(parts), "nbtune-best-so-far")


def _best_line(records: Sequence[dict[str, Any]], direction: str) -> list[tuple[float, float]]:
    """(trial number, best value so far) as a step line over finished trials, to the last trial number."""
    better = (lambda a, b: a < b) if direction == "minimize" else (lambda a, b: a > b)
    line: list[tuple[float, float]] = []
    best: float | None = None
    for r in records:
        if r.get("status") != "finished" or not _finite(r.get("value")):
            continue  # Optuna's best counts completed trials only: a pruned trial's value is an intermediate one
        if best is None or better(r["value"], best):
            if best is not None:
                line.append((r["number"], best))  # the step: flat up to this trial, then down (or up)
            best = r["value"]
            line.append((r["number"], best))
    last = max((r["number"] for r in records), default=None)
    if line and last is not None and last > line[-1][0]:
        line.append((last, line[-1][1]))  # flat to the latest trial: nothing since has beaten it
    return line


def metric_by_param_svgs(records: Sequence[dict[str, Any]], params: Sequence[str], metric: str) -> list[str]:
    """One small scatter per parameter: the optimised metric against that parameter's value in each trial."""
    return [_param_svg(records, name, metric) for name in params]


def _param_svg(records: Sequence[dict[str, Any]], name: str, metric: str) -> str:
    w, h = SMALL_WIDTH, SMALL_HEIGHT
    left, right, top, bottom = 38, w - 10, 10, h - 34
    values = [r["params"][name] for r in records if name in r.get("params", {})]
    shown = [r for r in records if name in r.get("params", {}) and _finite(r.get("value"))
             and r.get("status") != "failed"]
    caption = html.escape(name)
    if not shown:
        return _svg(w, h, _note(w, h, f"{caption}: no value yet"), "nbtune-param")
    low, high = padded([r["value"] for r in shown])
    y = _linear([low, high], bottom - INSET, top + INSET)
    if categorical(values):
        levels = _levels(values)
        step = (right - left) / len(levels)
        def x(v: Any) -> float:
            return left + step * (levels.index(_key(v)) + 0.5)
        ticks = "".join(f'<text x="{x(v):.1f}" y="{bottom + 12}" font-size="9" text-anchor="middle" '
                        f'class="category">{html.escape(_cut(fmt(v), 10))}</text>' for v in levels)
    else:
        numbers = [float(v) for v in values]
        log = _log_axis(numbers)
        start, end = left + INSET, right - INSET
        x = _log(numbers, start, end) if log else _linear(numbers, start, end)
        caption += " (log)" if log else ""
        if len(set(numbers)) == 1:  # one value so far: one tick, under its points
            ticks = (f'<text class="tick" x="{x(numbers[0]):.1f}" y="{bottom + 12}" font-size="9" '
                     f'text-anchor="middle">{html.escape(fmt(values[0]))}</text>')
        else:
            ticks = (f'<text class="tick" x="{left}" y="{bottom + 12}" font-size="9">'
                     f'{html.escape(fmt(min(numbers)))}</text>'
                     f'<text class="tick" x="{right}" y="{bottom + 12}" font-size="9" text-anchor="end">'
                     f'{html.escape(fmt(max(numbers)))}</text>')
    points = "".join(_point(x(r["params"][name]), y(r["value"]), r,
                            f"trial {r['number']}: {fmt(r['params'][name])} → {fmt(r['value'])}") for r in shown)
    labels = (f'<text class="high" x="2" y="{top + 6}" font-size="9">{fmt(float(high))}</text>'
              f'<text class="low" x="2" y="{bottom}" font-size="9">{fmt(float(low))}</text>'
              f'<text x="{left}" y="{h - 4}" font-size="10">{html.escape(metric)} by {caption}</text>')
    return _svg(w, h, _axes(left, right, top, bottom) + points + ticks + labels, "nbtune-param")


def categorical(values: Sequence[Any]) -> bool:
    """Shown as evenly spaced categories: any non-number (strings, booleans, None), or integers with few
    distinct values (choices such as lora_r 8/16/32); floats always get a numeric axis."""
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        return True
    return all(isinstance(v, int) for v in values) and len(set(values)) <= MAX_LEVELS


def _levels(values: Sequence[Any]) -> list[Any]:
    """Distinct values: numbers in order, anything else as first seen."""
    distinct = list(dict.fromkeys(_key(v) for v in values))
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in distinct):
        return sorted(distinct)
    return distinct


def _key(value: Any) -> Any:
    """A hashable stand-in for a category (a list-valued choice such as target_modules)."""
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def _log_axis(numbers: Sequence[float]) -> bool:
    return all(v > 0 for v in numbers) and max(numbers) / min(numbers) > LOG_SPAN


# --------------------------------------------------------------------------- SVG pieces
def padded(values: Sequence[float]) -> tuple[float, float]:
    """The value axis' range: the values' own, or for one value (or a flat series) that value +- 5% (0.05 about
    0), as matplotlib pads a singular range; an axis from 0.127 to 0.127 has no scale to read."""
    low, high = float(min(values)), float(max(values))
    if high > low:
        return low, high
    pad = abs(low) * 0.05 or 0.05
    return low - pad, high + pad


def _linear(values: Sequence[float], start: float, end: float) -> Callable[[Any], float]:
    """Maps the range of `values` onto [start, end] (end < start for a y axis); one value lands mid-way."""
    low, high = min(values), max(values)
    if high == low:
        return lambda v: (start + end) / 2
    return lambda v: start + (end - start) * (float(v) - low) / (high - low)


def _log(values: Sequence[float], start: float, end: float) -> Callable[[Any], float]:
    scale = _linear([math.log10(v) for v in values], start, end)
    return lambda v: scale(math.log10(float(v)))


def _point(x: float, y: float, record: dict[str, Any], tip: str) -> str:
    finished = record.get("status") == "finished"
    colour = POINT if finished else OTHER
    status = html.escape(str(record.get("status", "")))
    return (f'<circle class="trial {status}" cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{colour}">'
            f'<title>{html.escape(tip)} ({status})</title></circle>')


def _axes(left: float, right: float, top: float, bottom: float) -> str:
    return (f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#999"/>'
            f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#999"/>')


def _note(width: int, height: int, text: str) -> str:
    return f'<text x="{width / 2}" y="{height / 2}" font-size="11" text-anchor="middle">{text}</text>'


def _svg(width: int, height: int, inner: str, css: str = "nbtune-best-so-far") -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" class="{css}">{inner}</svg>')


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------- status and snapshot
def sweep_status_html(sweep: Any, detail: str = "") -> str:
    """'lr-sweep · minimize eval_loss · running — trial 3 of 12 · best 0.812 (trial 1)'."""
    colour = STATUS_COLOURS.get(sweep.status, "#555")
    best = sweep.best
    best_text = (f"best {fmt(best.get('value'))} (trial {best.get('number')})" if best else "no best yet")
    parts = [detail, best_text] if detail else [best_text]
    return (f"<b>{html.escape(sweep.name)}</b> · {html.escape(sweep.direction)} {html.escape(sweep.optimize)} · "
            f"<span style='color:{colour}'><b>{html.escape(sweep.status)}</b></span> — "
            f"{html.escape(' · '.join(parts))}")


def done_count(records: Sequence[dict[str, Any]]) -> int:
    """Trials done: all but one a Stop or an interrupt cut short (the sweep tries its params again)."""
    return sum(r.get("status") != "stopped" for r in records)


def charts_html(sweep: Any) -> str:
    """The best-so-far chart and one scatter per parameter, side by side, wrapping."""
    scatters = metric_by_param_svgs(sweep.records, sweep.params, sweep.optimize)
    return (f"<div style='display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start'>"
            f"{best_so_far_svg(sweep.records, sweep.direction, sweep.optimize)}{''.join(scatters)}</div>")


def sweep_snapshot_html(sweep: Any) -> str:
    """The static end state of a sweep: status line, trials table and charts, as plain HTML (no script), which
    a saved notebook, nbconvert and GitHub show without a kernel."""
    done = f"{done_count(sweep.records)} of {sweep.planned} trials"
    error = getattr(sweep, "error", None)
    best = sweep.best.get("number") if sweep.best else None
    return (f"<div class='nbtune-sweep-snapshot'>{sweep_status_html(sweep, f'{done} · {error}' if error else done)}"
            f"{trials_table_html(sweep.records, sweep.params, sweep.optimize, best_number=best)}"
            f"{charts_html(sweep)}</div>")


def sweep_html(sweep: Any) -> str | None:
    """A `Sweep`'s HTML where a notebook shows it (the formatter registered for it, nbtune/magics): the static
    snapshot once it ended; None while it runs, so its text shows and its live panel or line tells the rest."""
    return None if sweep.status == "running" else sweep_snapshot_html(sweep)
