"""How a notebook shows nbtune's engine objects: IPython display formatters, registered by class name.

The engine's objects (a Sweep, a CrossValidation, a Comparison, predictions, the run tables, a batch preview)
offer plain data and text; their HTML lives here, in the views, and the engine never imports a view. The
formatters are registered by the class's dotted name (`for_type_by_name`), so registering imports neither the
engine nor the views: `import nbtune` does it in a running IPython, and so does `%load_ext nbtune`. Each view
function is imported when an object is first shown.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

# (the engine class, the view that renders it as HTML: module:function)
HTML_VIEWS = (
    ("nbtune.engine.evaluation.predictions.Predictions", "nbtune.widgets.predictions_view:predictions_html"),
    ("nbtune.engine.evaluation.compare.Comparison", "nbtune.widgets.compare_view:comparison_html"),
    ("nbtune.engine.records.history.RunHistory", "nbtune.widgets.run_tables:history_html"),
    ("nbtune.engine.workbench.Runs", "nbtune.widgets.run_tables:runs_html"),
    ("nbtune.data.preview.BatchPreview", "nbtune.widgets.preview_view:preview_html"),
    ("nbtune.engine.experiments.crossval.CrossValidation", "nbtune.widgets.cv_view:cv_html"),
    ("nbtune.engine.experiments.sweep.Sweep", "nbtune.widgets.sweep_render:sweep_html"),
)
# Shown by a function that displays (and keeps current) rather than by HTML: a running sweep's line.
DISPLAYS = (("nbtune.engine.experiments.sweep.Sweep", "nbtune.widgets.sweep_panel:show_sweep"),)


def register_views(ipython: Any) -> None:
    """Show the engine's objects through their views in this IPython (idempotent)."""
    html = ipython.display_formatter.formatters["text/html"]
    for dotted, view in HTML_VIEWS:
        module, name = dotted.rsplit(".", 1)
        html.for_type_by_name(module, name, _lazy(view))
    shown = ipython.display_formatter.ipython_display_formatter
    for dotted, view in DISPLAYS:
        module, name = dotted.rsplit(".", 1)
        shown.for_type_by_name(module, name, _lazy(view))


def forget_views(ipython: Any) -> None:
    """Undo `register_views` (`%unload_ext nbtune`)."""
    html = ipython.display_formatter.formatters["text/html"]
    for dotted, _view in HTML_VIEWS:
        html.pop(dotted, None)
    shown = ipython.display_formatter.ipython_display_formatter
    for dotted, _view in DISPLAYS:
        shown.pop(dotted, None)


def register_in_running_ipython() -> None:
    """`import nbtune` in a notebook: register the views if IPython is running (never import it here)."""
    import sys

    ipython_module = sys.modules.get("IPython")
    shell = ipython_module.get_ipython() if ipython_module is not None else None
    if shell is not None:
        register_views(shell)


def html_of(obj: Any) -> str | None:
    """The HTML a notebook shows for `obj` (its registered view, else its own `_repr_html_`): for a page
    outside IPython, or a test."""
    views = dict(HTML_VIEWS)
    for cls in type(obj).__mro__:
        view = views.get(f"{cls.__module__}.{cls.__qualname__}")
        if view is not None:
            shown = _lazy(view)(obj)
            if shown is not None:
                return shown
    own = getattr(obj, "_repr_html_", None)
    return own() if own is not None else None


def _lazy(view: str) -> Callable[[Any], Any]:
    module, name = view.split(":")

    def show(obj: Any) -> Any:
        return getattr(importlib.import_module(module), name)(obj)

    show.__name__ = name
    return show
