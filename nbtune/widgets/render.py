"""Pure rendering of a run's state to HTML/SVG: the live panel's pieces and the static snapshot.

No widget code here: the panel puts these strings into ipywidgets.HTML while training, and the same
functions produce the snapshot left in the cell at the end, which a saved notebook, nbconvert HTML
and GitHub show without a kernel. A hand-drawn SVG keeps the panel free of a JavaScript build and
of plotting dependencies, and costs about a millisecond per redraw.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from typing import Any

from nbtune.engine.training.events import prompt_text

WIDTH, HEIGHT, PAD = 420, 180, 34


def smooth(values: Sequence[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def loss_chart(steps: Sequence[float], losses: Sequence[float], eval_steps: Sequence[float] = (),
               eval_losses: Sequence[float] = (), *, log_scale: bool = False, total: int | None = None,
               empty: str = "waiting for the first step ...", label: str = "loss") -> str:
    """SVG of the train loss (raw, faint), its smoothed curve, and eval loss points; `empty` when none.
    `label` names another per-step value drawn the same way (a preference run's reward margin)."""
    points = [(s, v) for s, v in zip(steps, losses, strict=True) if _finite(v)]
    evals = [(s, v) for s, v in zip(eval_steps, eval_losses, strict=True) if _finite(v)]
    if not points and not evals:
        return _frame(empty)
    values = [v for _, v in points + evals]
    if log_scale:
        values = [math.log10(max(v, 1e-12)) for v in values]
    low, high = value_range(values)
    x_max = max([total or 0] + [s for s, _ in points + evals] + [1])  # from step 0: one step still has a width

    def xy(step: float, value: float) -> tuple[float, float]:
        v = math.log10(max(value, 1e-12)) if log_scale else value
        x = PAD + (WIDTH - PAD - 8) * step / x_max
        y = 8 + (HEIGHT - PAD - 8) * (high - v) / (high - low)
        return x, y

    def polyline(series: list[tuple[float, float]], style: str) -> str:
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(s, v) for s, v in series))
        return f'<polyline fill="none" {style} points="{coords}"/>'

    parts = []
    if points:
        parts.append(polyline(points, 'stroke="#9ecae1" stroke-width="1"'))
        smoothed = list(zip([s for s, _ in points], smooth([v for _, v in points]), strict=True))
        parts.append(polyline(smoothed, 'stroke="#08519c" stroke-width="2"'))
    if len(points) == 1:  # a line through one point draws nothing: a dot shows the one step
        x, y = xy(*points[0])
        parts.append(f'<circle class="nbtune-only-step" cx="{x:.1f}" cy="{y:.1f}" r="3" fill="#08519c"/>')
    for s, v in evals:
        x, y = xy(s, v)
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="#e6550d"/>')
    scale = " (log)" if log_scale else ""
    top = 10**high if log_scale else high
    bottom = 10**low if log_scale else low
    labels = (f'<text x="2" y="14" font-size="10">{top:.3g}</text>'
              f'<text x="2" y="{HEIGHT - PAD}" font-size="10">{bottom:.3g}</text>'
              f'<text x="{WIDTH - 8}" y="{HEIGHT - 10}" font-size="10" text-anchor="end">step {x_max}</text>'
              f'<text x="{PAD}" y="{HEIGHT - 10}" font-size="10">{label}{scale}: train (raw, smoothed)'
              f'{", eval" if evals else ""}</text>')
    return _frame("".join(parts) + labels)


def rewards_chart(run: Any) -> str:
    """The curves the run's objective declares for the panel (`ObjectiveSpec.curves`), each by step and at
    each evaluation, titled with the latest value of the shares it declares; "" for a run that logs none (sft).
    For a preference run: the margin (chosen minus rejected) titled with the share of pairs it gets right; DPO's
    and KTO's are rewards relative to the reference, ORPO's and SimPO's the model's own log-probs (their specs
    name them apart and say what each means, which the tooltip shows)."""
    from nbtune.objectives.registry import all_objectives

    name = getattr(getattr(run, "config", None), "objective", None)
    # A stand-in without a config, or a saved run whose objective is no longer registered, declares nothing.
    objective = next((spec for spec in all_objectives() if spec.name == name), None)
    if objective is None:
        return ""
    evals = [{"step": e.get("step"), **objective.log_values(e, prefix="eval_")} for e in run.eval_history]
    keys = [key for record in [*run.history, *evals] for key in record]  # a curve with a `*`: one per key it matches
    shares = objective.curves_in(keys, "title")
    charts = [_curve_chart(run, curve, shares, evals) for curve in objective.curves_in(keys, "line")]
    return "".join(chart for chart in charts if chart)


def _curve_chart(run: Any, curve: Any, shares: Sequence[Any], all_evals: Sequence[dict[str, Any]]) -> str:
    history = [r for r in run.history if curve.key in r]
    evals = [e for e in all_evals if curve.key in e]
    if not history and not evals:
        return ""
    latest = [(f"{what} {share.label}", next((r[share.key] for r in reversed(records) if share.key in r), None))
              for share in shares for what, records in (("train", history), ("held-out", evals))]
    title = " · ".join(f"{name} {value:.2f}" for name, value in latest if _finite(value))
    chart = loss_chart([r["step"] for r in history], [r[curve.key] for r in history], [e["step"] for e in evals],
                       [e[curve.key] for e in evals], total=run.total_steps, label=curve.label)
    meaning = html.escape("; ".join(f"{c.key}: {c.meaning}" for c in [*shares, curve]), quote=True)
    return f"<div><div style='font-size:11px' title=\"{meaning}\">{html.escape(title)}</div>{chart}</div>"


def value_range(values: Sequence[float]) -> tuple[float, float]:
    """(bottom, top) of a chart's value axis: the values' range, or, for a flat series (one point, or a value
    that never moved), 10% either side of it (0.5 around zero), so the line sits mid-chart under two labels
    that differ, not on the bottom edge of a made-up range."""
    low, high = min(values), max(values)
    if high > low:
        return low, high
    pad = abs(low) * 0.1 or 0.5
    return low - pad, high + pad


def _frame(inner: str) -> str:
    if not inner.startswith("<"):
        inner = f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" font-size="12" text-anchor="middle">{inner}</text>'
    axes = (f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - 8}" y2="{HEIGHT - PAD}" stroke="#999"/>'
            f'<line x1="{PAD}" y1="8" x2="{PAD}" y2="{HEIGHT - PAD}" stroke="#999"/>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" class="nbtune-loss">{axes}{inner}</svg>')


def progress_line(step: int, total: int, tokens_per_second: float, elapsed: float, ended: str | None = None) -> str:
    """'step 12/60 · 214 tok/s · 0:25 elapsed · ETA 1:40'; once the run `ended`, its status instead of an ETA."""
    eta = elapsed / step * (total - step) if step else float("nan")
    return (f"step {step}/{total} · {tokens_per_second:,.0f} tok/s · {_clock(elapsed)} elapsed · "
            f"{ended if ended else f'ETA {_clock(eta)}'}")


def ended_before_a_step(status: str) -> str:
    """What an empty chart says for a run in `status`."""
    return "waiting for the first step ..." if status in ("pending", "running") else f"{status} before its first step"


def memory_html(memory: dict[str, Any]) -> str:
    """RSS now/peak, CUDA counters when present, and the estimated split of what is held."""
    rows = [("RSS now", memory.get("rss_mb")), ("RSS peak", memory.get("peak_rss_mb"))]
    rows += [(k.replace("_mb", "").replace("_", " "), v) for k, v in memory.items() if k.startswith("cuda_")]
    rows += [(label, memory.get(key)) for key, label in (
        ("weights_mb", "base weights"), ("trainable_mb", "trainable + grads"), ("optimizer_mb", "optimizer"),
        ("activations_mb", "activations, rest"))]
    cells = "".join(f"<tr><td>{html.escape(label)}</td><td style='text-align:right'>{_mb(v)}</td></tr>"
                    for label, v in rows if v is not None)
    return f"<table class='nbtune-memory'><tr><th colspan=2>memory</th></tr>{cells}</table>"


def metrics_table(metrics: dict[str, Any]) -> str:
    keys = ("trainable_params", "trainable_percent", "train_loss", "final_loss", "eval_loss", "exact_match",
            "tokens_per_second",
            "train_seconds", "peak_rss_mb", "cuda_peak_mb", "processes", "saved_to")
    cells = "".join(f"<tr><td>{k}</td><td>{html.escape(_value(metrics[k]))}</td></tr>"
                    for k in keys if metrics.get(k) is not None)
    return f"<table class='nbtune-metrics'>{cells}</table>"


def status_html(name: str, method: str, status: str, detail: str = "") -> str:
    colour = {"running": "#08519c", "finished": "#238b45", "stopped": "#d94801", "failed": "#cb181d",
              "pruned": "#888888"}.get(
        status, "#555")
    extra = f" — {html.escape(detail)}" if detail else ""
    return (f"<b>{html.escape(name)}</b> · {html.escape(method)} · "
            f"<span style='color:{colour}'><b>{html.escape(status)}</b></span>{extra}")


# Inline padding and alignment: the live panel's HTML widget gets none of the notebook's table styles, and
# without them the headers read "promptstepanswerbefore" and the columns touch.
_CELL = "padding:2px 10px 2px 0;text-align:left;vertical-align:top"


def samples_table(samples: Sequence[dict[str, Any]], width: int = 160) -> str:
    """The latest answer to each sample prompt, with its step and the answer before it; the "before" column
    only once some prompt has an earlier answer (the first round has none, and an empty column reads as
    a missing answer), '-' for a prompt without one then."""
    if not samples:
        return ""
    groups = _by_prompt(samples)
    with_before = any(len(records) > 1 for _, records in groups)
    rows = []
    for prompt, records in groups:
        latest = records[-1]
        cells = [_text(prompt, width // 2), str(latest["step"]), f"<b>{_text(latest['answer'], width)}</b>"]
        if with_before:
            before = records[-2] if len(records) > 1 else None
            cells.append(f"<span style='color:#888'>step {before['step']}:</span> {_text(before['answer'], width)}"
                         if before else "-")
        rows.append("<tr>" + "".join(f"<td style='{_CELL}'>{c}</td>" for c in cells) + "</tr>")
    names = ["prompt", "step", "answer", *(["before"] if with_before else [])]
    head = "<tr>" + "".join(f"<th style='{_CELL}'>{name}</th>" for name in names) + "</tr>"
    style = "text-align:left;border-collapse:collapse"
    return f"<table class='nbtune-samples' style='{style}'>{head}{''.join(rows)}</table>"


def samples_history(samples: Sequence[dict[str, Any]], width: int = 160) -> str:
    """Each sample prompt's answers over training, one line per answer that held for a stretch of steps
    ('steps 20-60: ...'), folded in a <details> element."""
    if not samples:
        return ""
    parts = []
    for prompt, records in _by_prompt(samples):
        lines = [f"<li>{_steps(first, last)}: {_text(answer, width)}</li>" for first, last, answer in _runs(records)]
        parts.append(f"<p style='margin:4px 0 0'>{_text(prompt, width)}</p><ul style='margin:0'>{''.join(lines)}</ul>")
    return f"<details class='nbtune-samples-history'><summary>answers by step</summary>{''.join(parts)}</details>"


def _by_prompt(samples: Sequence[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """(prompt text, its records in step order), prompts in the order they were first answered."""
    groups: dict[str, tuple[str, list[dict[str, Any]]]] = {}
    for record in samples:
        key = json.dumps(record["prompt"], sort_keys=True)  # chat messages are lists: not hashable
        groups.setdefault(key, (prompt_text(record["prompt"]), []))[1].append(record)
    return [(text, sorted(records, key=lambda r: r["step"])) for text, records in groups.values()]


def _runs(records: list[dict[str, Any]]) -> list[tuple[int, int, str]]:
    """(first step, last step, answer) for each stretch of steps with the same answer."""
    runs: list[tuple[int, int, str]] = []
    for record in records:
        if runs and runs[-1][2] == record["answer"]:
            runs[-1] = (runs[-1][0], record["step"], record["answer"])
        else:
            runs.append((record["step"], record["step"], record["answer"]))
    return runs


def _steps(first: int, last: int) -> str:
    return f"step {first}" if first == last else f"steps {first}-{last}"


def _text(text: Any, width: int) -> str:
    """Escaped and cut to `width` characters; the whole text in the tooltip when cut."""
    text = str(text)
    if len(text) <= width:
        return html.escape(text) if text else "<i>(empty)</i>"
    return f"<span title='{html.escape(text, quote=True)}'>{html.escape(text[: width - 1])}…</span>"


def snapshot_html(run: Any, memory: dict[str, Any], log_scale: bool = False) -> str:
    """The static end state of a run: status, loss chart, metrics and memory, sample answers (the latest
    per prompt and their history), as plain HTML."""
    steps = [r["step"] for r in run.history if "loss" in r]
    losses = [r["loss"] for r in run.history if "loss" in r]
    evals = [e for e in run.eval_history if "eval_loss" in e]
    chart = loss_chart(steps, losses, [e["step"] for e in evals], [e["eval_loss"] for e in evals],
                       log_scale=log_scale, total=run.total_steps, empty=ended_before_a_step(run.status))
    samples = getattr(run, "samples", [])
    reached = run.history[-1]["step"] if run.history else 0
    detail = run.error or f"step {reached}/{run.total_steps}"  # a stopped run shows how far it got
    return (f"<div class='nbtune-snapshot'>{status_html(run.name, run.method.name, run.status, detail)}"
            f"<div style='display:flex;gap:16px;align-items:flex-start'>{chart}{rewards_chart(run)}"
            f"{metrics_table(run.metrics)}{memory_html(memory)}</div>"
            f"{samples_table(samples)}{samples_history(samples)}</div>")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def _mb(value: Any) -> str:
    if value is None:
        return "-"
    if 0 < value < 10:  # a tiny model's adapter or optimizer: "0 MB" would read as nothing at all
        return f"{value:.2g} MB"
    return f"{value:,.0f} MB"


def _value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
