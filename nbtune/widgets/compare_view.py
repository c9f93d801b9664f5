"""`nbtune.compare(...)` as HTML: the table, the config diff, and all loss curves overlaid (static SVG)."""

from __future__ import annotations

import html
from typing import Any

from nbtune.engine.compare import Comparison
from nbtune.engine.workbench import _fmt
from nbtune.widgets.render import HEIGHT, PAD, WIDTH, smooth

COLOURS = ("#08519c", "#e6550d", "#31a354", "#756bb1", "#636363", "#d6616b", "#3182bd", "#8c6d31")


class ComparisonView(Comparison):
    """A `Comparison` that shows itself in a notebook: a live widget (with a prompt box that asks every
    run at once) where a frontend can show widgets, and the same content as static HTML for saved
    notebooks, nbconvert and GitHub."""

    def _repr_html_(self) -> str:
        return (f"<div class='nbtune-compare'>{table_html(self.table())}{diff_html(self.config_diff())}"
                f"<div style='display:flex;gap:16px'>{curves_svg(self.curves(), 'step')}"
                f"{curves_svg(self.curves(), 'elapsed_seconds')}</div></div>")

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        bundle = {"text/html": self._repr_html_(), "text/plain": f"<comparison of {len(self.runs)} runs>"}
        try:
            bundle.update(self.widget()._repr_mimebundle_(**kwargs) or {})
        except ImportError:  # no ipywidgets: the static HTML is the whole view
            pass
        bundle["text/html"] = self._repr_html_()  # what a saved notebook shows without a kernel
        return bundle

    def widget(self) -> Any:
        """The interactive view: the static comparison, plus prompts answered by the base and every run."""
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
    x_max, low, high = max(max(xs), 1e-9), min(ys), max(ys)
    high = high if high > low else low + 1.0
    lines, legend = [], []
    def xy(x: float, y: float) -> str:
        return f"{PAD + (WIDTH - PAD - 8) * x / x_max:.1f},{8 + (HEIGHT - PAD - 8) * (high - y) / (high - low):.1f}"

    for i, (name, (x_values, y_values)) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        points = " ".join(xy(x, y) for x, y in zip(x_values, y_values, strict=True))
        lines.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>')
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
