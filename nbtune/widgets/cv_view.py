"""A cross-validation as static HTML: a headline, then one table with a row per metric, a column per fold,
and the mean and (sample) standard deviation; plain HTML, so a saved notebook, nbconvert and GitHub show it.

    >>> cv = nbtune.finetune(cv=5, steps=30)   # doctest: +SKIP
    >>> cv                                      # a notebook renders cv_html(cv)

The engine's `CrossValidation` (engine/experiments/crossval.py) offers the plain rows (`table()`); this renders
them, registered as its HTML by nbtune/magics (the engine never imports display code).
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

from nbtune.widgets.compare_view import table_html

if TYPE_CHECKING:
    from nbtune.engine.experiments.crossval import CrossValidation


def cv_html(cv: CrossValidation) -> str:
    """`cv.table()` as an HTML table under its headline; an incomplete one says so in the headline."""
    return (f"<div class='nbtune-cv'><p><b>{html.escape(cv.headline())}</b></p>{table_html(cv.table())}"
            f"<p><small>mean and sample std (n-1) over the finished folds; each fold is a run in nbtune.runs, "
            f"side by side with <code>.compare()</code></small></p></div>")
