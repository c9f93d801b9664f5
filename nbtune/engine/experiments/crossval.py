"""Cross-validation: `cv: k` trains k ordinary runs, one per fold of `data`, on the one cached base, and
reports each fold and the mean +- std of every metric.

    >>> cv = nbtune.finetune(name="r8", cv=5, steps=30)   # doctest: +SKIP
    >>> cv                                                 # each fold, then mean +- std per metric
    >>> cv.summary()["eval_loss"]                          # doctest: +SKIP
    {'mean': 1.23, 'std': 0.04, 'folds': 5}
    >>> cv.compare()                                       # the fold runs side by side

Fold i is the run `<name>-fold<i>` (config: the same, plus `cv_fold: i`; saved to `<output_dir>-fold<i>`),
in `nbtune.runs` like any run: comparable, saveable, and its `to_yaml()` repeats exactly that fold
(nbtune/data/splits.py cuts the folds from `data` and `seed` alone). Every fold trains on a view of the
base the kernel cached (engine/workbench.py): the weights load once for all k.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from nbtune.config import RunConfig
from nbtune.engine.records.text import cell
from nbtune.errors import ConfigError, RunInterrupted

if TYPE_CHECKING:
    from nbtune.engine.records.run import Run
    from nbtune.engine.workbench import Workbench

# Which numbers of `run.metrics` a fold reports: every int or float except counts and costs that are the same
# for every fold or describe the machine rather than the model (parameters, steps, memory, loading time,
# throughput), and `first_loss` (the untrained model's loss on one batch). `train_seconds` stays: what a fold
# costs is worth its mean too. The held-out numbers come first, then the training ones.
BOOKKEEPING = frozenset({"steps", "samples", "tokens", "tokens_per_second", "load_seconds", "first_loss"})
BOOKKEEPING_SUFFIXES = ("_params", "_percent", "_mb")
SEPARATORS = "/\\"  # a trailing one in `output_dir: out/` would put the fold's suffix inside the folder


def fold_metrics(run: Run) -> dict[str, float]:
    """The results in `run.metrics` that a cross-validation averages (see BOOKKEEPING for the rule)."""
    chosen = {key: value for key, value in run.metrics.items()
              if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and key not in BOOKKEEPING and not key.endswith(BOOKKEEPING_SUFFIXES)}
    return dict(sorted(chosen.items(), key=lambda item: _of_training(item[0])))  # stable: else as recorded


def _of_training(key: str) -> bool:
    return key.startswith("train_") or key.endswith("_seconds")


class CrossValidation:
    """The k fold runs of one cross-validation, with each fold's metrics and their mean +- std.

    `runs` are ordinary `Run`s (also in `nbtune.runs`); `folds` is one dict per fold; `summary()` the mean,
    sample standard deviation and count of every metric over the folds that finished; `df` a DataFrame;
    `to_dict()` what `nbtune run --json` prints. Shows as a table (plain text, or static HTML in a notebook).
    """

    def __init__(self, config: RunConfig, runs: Sequence[Run], *, rows: int) -> None:
        self.config = config  # the whole cross-validation's config (`cv` set, no `cv_fold`)
        self.runs = list(runs)
        self.rows = rows  # rows of `data` the folds were cut from

    @property
    def name(self) -> str:
        return str(self.config.name)

    @property
    def complete(self) -> bool:
        """Every fold trained to its end; False when a Stop or a divergence ended one early."""
        return len(self.runs) == self.config.cv and all(r.status == "finished" for r in self.runs)

    @property
    def folds(self) -> list[dict[str, Any]]:
        """Per fold: fold, run, status, train_rows, eval_rows, then every metric (`fold_metrics`)."""
        out = []
        for run in self.runs:
            fold = int(run.config.cv_fold or 0)
            eval_rows = fold_size(self.rows, self.config.cv, fold)
            out.append({"fold": fold, "run": run.name, "status": run.status, "train_rows": self.rows - eval_rows,
                        "eval_rows": eval_rows, **fold_metrics(run)})
        return out

    def summary(self) -> dict[str, dict[str, float | int | None]]:
        """metric -> {"mean", "std" (sample: ddof=1; None from one fold), "folds"} over the finished folds
        (a stopped or diverged fold's numbers describe a run that did not train to its end)."""
        finished = [fold_metrics(r) for r in self.runs if r.status == "finished"]
        keys = list(dict.fromkeys(k for metrics in finished for k in metrics))
        out: dict[str, dict[str, float | int | None]] = {}
        for key in keys:
            values = [m[key] for m in finished if key in m]
            out[key] = {"mean": statistics.fmean(values),
                        "std": statistics.stdev(values) if len(values) > 1 else None, "folds": len(values)}
        return out

    def table(self) -> list[dict[str, Any]]:
        """The report as rows: one per metric (and per fold's status and sizes), a column per fold, then
        mean and std; what the text and HTML views show."""
        folds, summary = self.folds, self.summary()
        columns = [f"fold{f['fold']}" for f in folds]
        rows = [{"metric": key, **{c: f[key] for c, f in zip(columns, folds, strict=True)}, "mean": None, "std": None}
                for key in ("run", "status", "train_rows", "eval_rows")]
        for key, stats in summary.items():
            rows.append({"metric": key, **{c: f.get(key) for c, f in zip(columns, folds, strict=True)},
                         "mean": stats["mean"], "std": stats["std"]})
        return rows

    @property
    def df(self) -> Any:
        """A pandas DataFrame: a row per fold (index: the fold number), then a `mean` and a `std` row."""
        import pandas as pd

        frame = pd.DataFrame(self.folds).set_index("fold")
        summary = self.summary()
        extra = pd.DataFrame([{k: s["mean"] for k, s in summary.items()}, {k: s["std"] for k, s in summary.items()}],
                             index=["mean", "std"])
        # the mean and std rows have no row counts: keep those whole numbers, not floats with NaN
        return pd.concat([frame, extra]).astype({"train_rows": "Int64", "eval_rows": "Int64"}) if summary else frame

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready): name, cv, rows, complete, folds, summary."""
        return {"name": self.name, "cv": self.config.cv, "rows": self.rows, "complete": self.complete,
                "folds": self.folds, "summary": self.summary()}

    def compare(self) -> Any:
        """The fold runs side by side (`nbtune.compare`): table, config diff, curves, answers."""
        from nbtune.api import compare

        return compare(*self.runs)

    def __repr__(self) -> str:
        return "\n".join([self.headline(), *_text_table(self.table())])

    def headline(self) -> str:
        done = sum(r.status == "finished" for r in self.runs)
        state = "" if self.complete else " (incomplete)"
        return (f"cross-validation {self.name!r}: {done} of {self.config.cv} folds finished{state}, "
                f"{self.rows} rows of data")

    def _repr_html_(self) -> str:
        from nbtune.widgets.cv_view import cv_html  # the engine layer never imports display code at load

        return cv_html(self)


def fold_size(rows: int, folds: int, fold: int) -> int:
    """Rows in fold `fold` (1-based): the eval rows of that fold's run."""
    from nbtune.data.splits import fold_bounds

    start, end = fold_bounds(rows, folds, fold)
    return end - start


def _text_table(rows: list[dict[str, Any]]) -> list[str]:
    """`table()` as aligned text, "mean +- std" in one column as people write it."""
    if not rows:
        return []
    header = [*(k for k in rows[0] if k not in ("mean", "std")), "mean +- std"]
    lines = [header]
    for row in rows:
        spread = "" if row["mean"] is None else f"{cell(row['mean'])} +- {cell(row['std'])}"
        lines.append([*(cell(v) for k, v in row.items() if k not in ("mean", "std")), spread])
    widths = [max(len(cell) for cell in column) for column in zip(*lines, strict=True)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines]


# ---------------------------------------------------------------------------- training
def cross_validate(config: RunConfig | dict[str, Any] | str | None = None, *, base: Any = None,
                   observers: Any = (), progress: bool = False, background: bool = False,
                   on_ready: Callable[[Run], None] | None = None, resume_from: Any = None,
                   bench: Workbench, **overrides: Any) -> CrossValidation:
    """Train one run per fold of `config`'s `cv` folds, one after another, each on a view of the cached base
    (or of `base`, a (model, tokenizer) the caller loaded); see `nbtune.finetune`, which calls this for a
    config with `cv` and no `cv_fold`.

    Every fold's config, the fold count and the data are checked before any weight loads. `observers`
    watch every fold run, and `on_ready(run)` is called for each before it trains; `progress=True` adds
    a step bar per fold to the bar over folds. A Stop on a fold run ends the cross-validation after that
    fold (the result is then incomplete). An interrupt keeps the folds trained so far in `nbtune.runs` and
    raises `RunInterrupted` (its `.cross_validation` holds them). A fold that raises ends it too.
    """
    config = RunConfig.parse(config, **overrides)
    _refuse_unsupported(config, background, resume_from)
    folds = fold_configs(config)
    rows = _rows_checked(folds[0])  # fold count, format and metrics: before any weight loads
    watchers = list(observers) if isinstance(observers, Iterable) else [observers]  # each fold gets them all
    done: list[Run] = []
    bar = _fold_bar(config.cv)
    try:
        for fold in folds:
            note = (f"cross-validation {config.name!r}: {len(done)} of {config.cv} folds had finished before "
                    "this one; they stay in nbtune.runs.")
            run = _train_fold(bench, fold, base, note, observers=watchers, progress=progress, on_ready=on_ready)
            done.append(run)
            bar.update(1)
            bar.set_postfix(_postfix(run))
            if run.status == "stopped":  # a Stop means the whole cross-validation, not just this fold
                break
    except KeyboardInterrupt as exc:  # in a fold (then a RunInterrupted) or between two
        raise _interrupted(config, done, exc, bench, rows) from None
    finally:
        bar.close()
    return CrossValidation(config, done, rows=rows)


def _train_fold(bench: Workbench, fold: RunConfig, base: Any, note: str, **watching: Any) -> Run:
    """One fold's run, trained through the workbench: an ordinary run in `nbtune.runs`, on a view of the
    cached base (or of the caller's `base`: a fresh view per fold, so no fold trains on another's adapter)."""
    view = None if base is None else bench.view_for(fold, base=base)
    try:
        return bench.finetune(fold, base=view, **watching)
    except Exception as exc:
        if hasattr(exc, "add_note"):  # Python 3.11+: a traceback then says what the cross-validation kept
            exc.add_note(note)
        raise


def fold_configs(config: RunConfig) -> list[RunConfig]:
    """One config per fold: `cv_fold: i`, name `<name>-fold<i>`, and `<output_dir>-fold<i>` when the user
    chose a folder (else the default runs/<name>-fold<i>). Parsed now, so a name or folder a fold cannot
    have is refused before anything trains."""
    out = []
    for fold in range(1, config.cv + 1):
        changes: dict[str, Any] = {"cv_fold": fold, "name": f"{config.name}-fold{fold}"}
        if config.output_dir:
            changes["output_dir"] = str(config.output_dir).rstrip(SEPARATORS) + f"-fold{fold}"
        out.append(RunConfig.parse(config, **changes))
    return out


def _refuse_unsupported(config: RunConfig, background: bool, resume_from: Any) -> None:
    if background:
        raise ConfigError(f"`cv: {config.cv}` trains its folds one after another while the cell runs; "
                          "`background` is for one run: drop it, or train one fold in the background with "
                          "`cv_fold`.", field="cv")
    if resume_from is not None:
        raise ConfigError("`resume_from` continues one run; continue a stopped fold by its own config, e.g. "
                          f"nbtune.finetune(nbtune.runs['{config.name}-fold2'].config, resume_from='latest').",
                          field="cv")


def _rows_checked(first_fold: RunConfig) -> int:
    """How many rows the folds are cut from; reading them checks the fold count (splits.py)."""
    from nbtune.data.splits import read_data

    train, evaluation, _ = read_data(first_fold)
    return len(train) + len(evaluation)


def _fold_bar(folds: int) -> Any:
    from nbtune.engine.training.distributed import is_main_process
    from nbtune.engine.training.progress import progress_bar

    return progress_bar(total=folds, desc="cross-validation", unit="fold", leave=True, disable=not is_main_process())


def _postfix(run: Run) -> dict[str, str]:
    """The fold's main number for the bar: its first named metric, else eval_loss, else train_loss."""
    spec = run.config.metric
    named = [m for m in (spec if isinstance(spec, list) else [spec]) if isinstance(m, str)]
    metrics = fold_metrics(run)
    for key in (*named, "exact_match", "eval_loss", "train_loss"):
        if key in metrics:
            return {f"fold{run.config.cv_fold} {key}": f"{metrics[key]:.4g}"}
    return {}


def _interrupted(config: RunConfig, done: list[Run], exc: BaseException, bench: Workbench,
                 rows: int) -> RunInterrupted:
    """The interrupt, said for the whole cross-validation; the fold it stopped is kept if it trained."""
    stopped = getattr(exc, "run", None)
    kept = stopped if stopped is not None and bench.runs.get(stopped.name) is stopped else None
    where = f"; {exc}" if isinstance(exc, RunInterrupted) and str(exc) else ""
    error = RunInterrupted(f"cross-validation {config.name!r} was interrupted with {len(done)} of {config.cv} "
                           f"folds finished (in nbtune.runs: {', '.join(r.name for r in done) or 'none'}){where}",
                           kept)
    error.cross_validation = CrossValidation(config, [*done, *([kept] if kept else [])], rows=rows)
    return error
