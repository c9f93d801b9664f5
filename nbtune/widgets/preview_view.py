"""`nbtune.preview(...)` as static HTML: each example's tokens as boxes, those that carry loss green,
padding grey, special tokens outlined, a TRUNCATED badge where `max_length` cut an example.

Plain strings, no widget and no script: a saved notebook, nbconvert and GitHub show it as it was. The
styles are inline as well as named by class (`nbt-loss`, `nbt-pad`, `nbt-special`), because sanitising
frontends drop `<style>` elements.
"""

from __future__ import annotations

import html
from typing import Any

TOKEN = "border-right:1px solid #9e9e9e;padding:0 1px;white-space:pre-wrap;"
LOOKS = {
    "nbt-loss": "background:#b7e4b0;",
    "nbt-pad": "background:#eeeeee;color:#9e9e9e;",
    "nbt-special": "outline:1px dashed #616161;font-weight:bold;",
}
BADGE = "background:#c62828;color:#fff;border-radius:3px;padding:0 4px;margin-left:6px;font-size:11px;"
BOX = "font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px;line-height:1.8;"


def preview_html(preview: Any) -> str:
    """The whole preview (a `nbtune.data.preview.BatchPreview`): what it shows, a legend, then each example."""
    header = "<br>".join(html.escape(line) for line in preview.header().splitlines())
    count = len({ex.position for ex in preview.examples})  # a preference pair is two sequences at one place
    examples = "".join(example_html(ex, count, preview) for ex in preview.examples)
    return (f"<div class='nbt-preview' style='{BOX}'><div style='font-family:sans-serif;margin-bottom:6px'>"
            f"{header}</div>{legend_html()}{examples}</div>")


def legend_html() -> str:
    samples = [("nbt-loss", "carries loss (predicted, trained on)"), ("", "no loss (context only)"),
               ("nbt-pad", "padding (not attended)"), ("nbt-special", "special token")]
    items = " ".join(_span(name, html.escape(text), None) for name, text in samples)
    return f"<div style='margin-bottom:8px'>{items} <span style='font-family:sans-serif'>↵ newline</span></div>"


def example_html(ex: Any, count: int, preview: Any) -> str:
    """One example: a summary line and its tokens, each a box with its id and raw string on hover."""
    badge = (f"<span class='nbt-truncated' style='{BADGE}'>TRUNCATED {ex.length}/{ex.full_length}</span>"
             if ex.truncated else "")
    side = f" <b>{html.escape(ex.side)}</b>" if getattr(ex, "side", "") else ""
    summary = (f"<b>{ex.position + 1}/{count}</b> row {ex.row}{side} · {ex.length} tokens · {ex.loss_tokens} carry loss"
               f" · {ex.padded} padding{badge}")
    tokens = "".join(
        _span(" ".join(_classes(loss, pad, special)), _visible(piece), f"{tid} {token!r}")
        for tid, token, piece, loss, pad, special in zip(ex.token_ids, ex.tokens, ex.pieces, ex.loss, ex.padding,
                                                         ex.special, strict=True))
    return (f"<div class='nbt-example' style='margin:10px 0'><div style='font-family:sans-serif'>{summary}</div>"
            f"<div style='border:1px solid #e0e0e0;padding:4px'>{tokens}</div></div>")


def _classes(loss: bool, pad: bool, special: bool) -> list[str]:
    return [name for name, on in (("nbt-loss", loss), ("nbt-pad", pad), ("nbt-special", special)) if on]


def _span(classes: str, body: str, title: str | None) -> str:
    style = TOKEN + "".join(LOOKS[name] for name in classes.split())
    hover = f" title='{html.escape(title, quote=True)}'" if title is not None else ""
    return f"<span class='nbt-tok {classes}'{hover} style='{style}'>{body}</span>"


def _visible(piece: str) -> str:
    """The token's text, escaped, with newlines and tabs drawn (and still breaking the line)."""
    if piece == "":
        return "∅"
    return html.escape(piece).replace("\n", "↵\n").replace("\t", "→\t")


__all__ = ["example_html", "legend_html", "preview_html"]
