"""`nbtune.compare(...)` as HTML: the table, the config diff, and all loss curves overlaid (static SVG)."""

from __future__ import annotations

import html
from typing import Any

from nbtune.engine.evaluation.compare import Comparison
from nbtune.engine.records.text import cell as _fmt
from nbtune.errors import NbtuneError
from nbtune.widgets.render import HEIGHT, PAD, WIDTH, smooth, value_range

AGREEMENT_ROWS = 20
COLOURS = ("#08519c", "#e6550d", "#31a354", "#756bb1", "#636363", "#d6616b", "#3182bd", "#8c6d31")


class ComparisonView(Comparison):
    """A `Comparison` that shows itself in a notebook as static HTML: the same in the live notebook, the
    saved one reopened, nbconvert and GitHub. The interactive view (a prompt box that asks every run at
    once) needs the kernel that holds the runs, so it is shown only when asked for: `cmp.widget()`."""

    def _repr_html_(self) -> str:
        return (f"<div class='nbtune-compare'>{table_html(self.table())}{self._significance_html()}"
                f"{diff_html(self.config_diff())}"
                f"<div style='display:flex;gap:16px'>{curves_svg(self.curves(), 'step')}"
                f"{curves_svg(self.curves(), 'elapsed_seconds')}</div>{self._agreement_html()}</div>")

    def _significance_html(self) -> str:
        """The bootstrap interval when two runs (or one run and its base) scored the same rows."""
        from nbtune.engine.evaluation.significance import describe, scored

        if not 1 <= len(scored(self.runs)) <= 2:
            return ""
        try:
            return f"<p><b>is it real?</b> {html.escape(describe(self.bootstrap()))}</p>"
        except NbtuneError as exc:  # no shared rows or metric: the table says enough
            return f"<p><small>no bootstrap interval: {html.escape(str(exc))}</small></p>"

    def _agreement_html(self, shown: int = AGREEMENT_ROWS) -> str:
        """Which rows each run gets right (first metric they share): counts, then the rows, the ones the
        runs disagree on first."""
        from nbtune.engine.evaluation.metrics import METRICS
        from nbtune.engine.evaluation.significance import agreement_counts, base_columns, primary_metric, scored

        runs = scored(self.runs)
        if not runs:
            return ""
        try:
            metric = primary_metric(runs)
            rows = self.agreement(metric)
        except NbtuneError:
            return ""
        best = METRICS[metric].best if metric in METRICS else 1.0
        names, bases = [r.name for r in runs], base_columns(runs)  # `base`, or one column per base
        counts = agreement_counts(rows, names, best)
        # rows the runs disagree on first, then those where they agree and the base does not
        disagreeing = sorted(rows, key=lambda r: (len({_mark(r.get(n), best) for n in names}) == 1,
                                                  len({_mark(r.get(n), best) for n in [*bases, *names]}) == 1))
        shown_rows = [{"row": r["row"], "prompt": r["prompt"], "reference": r["reference"],
                       **{n: _mark(r.get(n), best) for n in [*bases, *names]}} for r in disagreeing[:shown]]
        summary = f"{metric}: " + " · ".join(f"{k}: {v}" for k, v in counts.items())
        more = f"<p><i>{len(rows) - shown} more rows: cmp.agreement() has them all</i></p>" if len(rows) > shown else ""
        return (f"<p><b>per-example agreement</b> ({html.escape(summary)})</p>{table_html(shown_rows)}{more}")

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        # HTML and text only, never a widget view: a frontend prefers the widget when both are offered, and a
        # saved notebook keeps the widget's output but not its state, so reopened it shows "Error displaying
        # widget: model not found" where the table was.
        return {"text/html": self._repr_html_(), "text/plain": f"<comparison of {len(self.runs)} runs>"}

    def widget(self) -> Any:
        """The interactive view: the static comparison, plus prompts answered by the base and every run
        (`cmp.widget()` in a cell; it needs this kernel, so a saved notebook keeps no working copy of it)."""
        import ipywidgets as w

        prompts = w.Textarea(placeholder="one prompt per line", layout=w.Layout(width="600px", height="80px"))
        ask = w.Button(description="Ask every run", icon="comments")
        answers = w.HTML()

        def on_ask(_button: Any) -> None:
            lines = [line for line in prompts.value.splitlines() if line.strip()]
            answers.value = table_html(self.generations(lines)) if lines else ""

        ask.on_click(on_ask)
        return w.VBox([w.HTML(self._repr_html_()), w.HBox([prompts, ask]), answers])

    def generations_html(self, prompts: Any, **kwargs: Any) -> Any:
        """The side-by-side answers as an HTML table (display it, or return it from a cell)."""
        from IPython.display import HTML

        return HTML(table_html(self.generations(prompts, **kwargs)))


def comparison_html(comparison: Comparison) -> str | None:
    """A `Comparison` (a sweep's or a cross-validation's `compare()`) shown as `nbtune.compare`'s view is; None
    for a `ComparisonView`, which shows itself."""
    if isinstance(comparison, ComparisonView):
        return None
    return ComparisonView(comparison.runs, every_run=comparison.every_run)._repr_html_()


def _mark(score: Any, best: float = 1.0) -> str:
    """✓ for a perfect row score, ✗ otherwise, '-' for none (with the score when it is partial)."""
    if not isinstance(score, (int, float)):
        return "-"
    return "✓" if score >= best - 1e-9 else ("✗" if score <= 0 else f"✗ {score:.3g}")


def table_html(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<i>nothing to compare</i>"
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row.values()) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def diff_html(diff: dict[str, dict[str, Any]]) -> str:
    if not diff:
        return "<p><i>the runs' configs are identical apart from their names</i></p>"
    rows = [{"key": key, **values} for key, values in diff.items()]
    return "<p><b>config keys that differ</b></p>" + table_html(rows)


def curves_svg(curves: dict[str, dict[str, list[float]]], x_key: str) -> str:
    """Every run's smoothed train loss on one chart, by step or by wall time."""
    series = {name: (c[x_key], smooth(c["loss"])) for name, c in curves.items() if c["loss"]}
    if not series:
        return ""
    xs = [x for x_values, _ in series.values() for x in x_values] or [1]
    ys = [y for _, y_values in series.values() for y in y_values]
    x_max, (low, high) = max(max(xs), 1e-9), value_range(ys)  # a flat or one-point curve sits mid-chart
    lines, legend = [], []
    def xy(x: float, y: float) -> str:
        return f"{PAD + (WIDTH - PAD - 8) * x / x_max:.1f},{8 + (HEIGHT - PAD - 8) * (high - y) / (high - low):.1f}"

    for i, (name, (x_values, y_values)) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        points = " ".join(xy(x, y) for x, y in zip(x_values, y_values, strict=True))
        lines.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>')
        if len(y_values) == 1:  # a line through one point draws nothing: a dot for a one-step run
            cx, cy = points.split(",")
            lines.append(f'<circle cx="{cx}" cy="{cy}" r="3" fill="{colour}"/>')
        legend.append(f'<text x="{WIDTH - 10}" y="{16 + 12 * i}" font-size="10" text-anchor="end" '
                      f'fill="{colour}">{html.escape(name)}</text>')
    label = "step" if x_key == "step" else "seconds"
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}">'
            f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - 8}" y2="{HEIGHT - PAD}" stroke="#999"/>'
            f'<line x1="{PAD}" y1="8" x2="{PAD}" y2="{HEIGHT - PAD}" stroke="#999"/>{"".join(lines)}{"".join(legend)}'
            f'<text x="2" y="14" font-size="10">{high:.3g}</text>'
            f'<text x="2" y="{HEIGHT - PAD}" font-size="10">{low:.3g}</text>'
            f'<text x="{PAD}" y="{HEIGHT - 10}" font-size="10">smoothed train loss by {label} '
            f'(to {x_max:.3g})</text></svg>')
