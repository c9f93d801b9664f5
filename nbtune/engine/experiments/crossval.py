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

A cross-validation is a group of runs (engine/experiments/groups.py, as a sweep is): one bar over the
folds, `cv.stop()` or a fold's Stop ends it after that fold, a fold that raises is recorded failed and the
others go on, an interrupt keeps the folds so far, and `nbtune.cross_validations[name]` holds it. Its
notebook view is nbtune/widgets/cv_view.py's `cv_html(cv)`.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from nbtune.config import RunConfig
from nbtune.engine.experiments.groups import Child, Group, said
from nbtune.engine.records.text import cell
from nbtune.errors import ConfigError, NbtuneWarning, RunInterrupted

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


class CrossValidation(Group):
    """The k fold runs of one cross-validation, with each fold's metrics and their mean +- std: a group of
    runs (engine/experiments/groups.py) whose children are the folds, trained in order.

    `runs` are ordinary `Run`s (also in `nbtune.runs`); `folds` is one dict per fold; `summary()` the mean,
    sample standard deviation and count of every metric over the folds that finished; `df` a DataFrame;
    `table()` the rows its text and notebook view show; `to_dict()` what `nbtune run --json` prints;
    `stop()` ends it after the running fold's current step. `nbtune.cross_validations[name]` holds it.
    """

    kind, event, unit, registry = "cross-validation", "cv", "fold", "nbtune.cross_validations"

    def __init__(self, config: RunConfig, folds: Sequence[RunConfig], *, rows: int, bench: Workbench,
                 base: Any = None, observers: Iterable[Any] = (), progress: bool = False,
                 on_ready: Callable[[Run], None] | None = None) -> None:
        super().__init__(config, bench=bench, base=base, observers=observers, progress=progress)
        self.rows = rows  # rows of `data` the folds were cut from
        self.fold_configs = list(folds)
        self.on_ready = on_ready  # called with each fold's run before it trains (the notebook shows its panel)
        # Each fold tried, in order: (fold number, its run: None only when it failed before it had one)
        self._tried: list[tuple[int, Run | None]] = []
        self._errors: dict[int, str] = {}  # fold -> why it failed, for a fold that raised
        self._cut: Run | None = None  # the fold an interrupt stopped, kept

    @property
    def runs(self) -> list[Run]:
        """The fold runs, in fold order (a stopped one included)."""
        return [run for _, run in self._tried if run is not None]

    @property
    def complete(self) -> bool:
        """Every fold trained to its end; False when a Stop, a failure or a divergence ended one early."""
        return len(self.runs) == self.config.cv and all(r.status == "finished" for r in self.runs)

    @property
    def folds(self) -> list[dict[str, Any]]:
        """Per fold: fold, run, status, train_rows, eval_rows, then every metric (`fold_metrics`); a fold that
        raised also has its `error`."""
        return [self._fold(number, run) for number, run in self._tried]

    def _fold(self, number: int, run: Run | None) -> dict[str, Any]:
        eval_rows = fold_size(self.rows, self.config.cv, number)
        out: dict[str, Any] = {"fold": number, "run": None if run is None else run.name,
                               "status": "failed" if run is None else run.status,
                               "train_rows": self.rows - eval_rows, "eval_rows": eval_rows}
        if number in self._errors:
            out["error"] = self._errors[number]
        return {**out, **(fold_metrics(run) if run is not None else {})}

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
        """Plain data (JSON-ready): name, cv, rows, status, complete, folds, summary."""
        return {"name": self.name, "cv": self.config.cv, "rows": self.rows, "status": self.status,
                "complete": self.complete, "folds": self.folds, "summary": self.summary()}

    def headline(self) -> str:
        done = sum(r.status == "finished" for r in self.runs)
        state = "" if self.complete else " (incomplete)"
        return (f"cross-validation {self.name!r}: {done} of {self.config.cv} folds finished{state}, "
                f"{self.rows} rows of data")

    def _text_rows(self) -> list[dict[str, Any]]:
        """`table()` with mean and std in one column, "mean +- std", as people write it."""
        return [{**{k: v for k, v in row.items() if k not in ("mean", "std")},
                 "mean +- std": "" if row["mean"] is None else f"{cell(row['mean'])} +- {cell(row['std'])}"}
                for row in self.table()]

    def _compared(self) -> list[Run]:
        return self.runs

    # ------------------------------------------------------------------ the strategy
    @property
    def planned(self) -> int:
        return int(self.config.cv)

    def _wanted(self) -> bool:
        # a fold not tried yet, or one a Stop cut short: either way the cross-validation is not done
        return len(self._tried) < self.planned or any(r.status == "stopped" for r in self.runs)

    def _next(self) -> Child | None:
        fold = self.fold_configs[len(self._tried)]
        return Child(number=int(fold.cv_fold or 0), params={"cv_fold": fold.cv_fold}, about=fold)

    def _child_config(self, child: Child) -> RunConfig:
        return child.about

    def _ready(self, child: Child, run: Run) -> None:
        if self.on_ready is not None:
            self.on_ready(run)

    def _ended(self, child: Child, run: Run) -> dict[str, Any]:
        self._tried.append((child.number, run))
        return self._fold(child.number, run)

    def _failed(self, child: Child, error: Exception) -> dict[str, Any]:
        self._tried.append((child.number, child.run))
        self._errors[child.number] = said(error)
        # said where it happens (the table only says "failed"); the next fold may well succeed
        warnings.warn(f"cross-validation {self.name!r}: fold {child.number} failed ({said(error)}); the other "
                      "folds go on.", NbtuneWarning, stacklevel=2)
        return self._fold(child.number, child.run)

    def _cut_short(self, child: Child, run: Run | None) -> dict[str, Any] | None:
        if run is None or self.bench.runs.get(run.name) is not run:  # nothing trained: nothing was kept
            return None
        self._cut = run
        self._tried.append((child.number, run))
        return self._fold(child.number, run)

    def _interrupted(self, exc: BaseException) -> RunInterrupted:
        """The interrupt, said for the whole cross-validation: the folds it kept, and where it is now."""
        done = [r.name for r in self.runs if r is not self._cut and self.bench.runs.get(r.name) is r]
        where = f"; {exc}" if isinstance(exc, RunInterrupted) and str(exc) else ""
        # The cell raised, so it returned no CrossValidation: nbtune.cross_validations holds it
        error = RunInterrupted(f"cross-validation {self.name!r} was interrupted with {len(done)} of {self.planned} "
                               f"folds finished (in nbtune.runs: {', '.join(done) or 'none'}); "
                               f"{self.registry}[{self.name!r}] is what it kept (its table, .compare()){where}",
                               self._cut)
        error.cross_validation = self  # type: ignore[attr-defined]
        return error

    def _postfix(self, record: dict[str, Any]) -> dict[str, str]:
        """The fold's main number for the bar: its first named metric, else exact_match, eval_loss, train_loss."""
        spec = self.config.metric
        named = [m for m in (spec if isinstance(spec, list) else [spec]) if isinstance(m, str)]
        for key in (*named, "exact_match", "eval_loss", "train_loss"):
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return {f"fold{record['fold']} {key}": f"{value:.4g}"}
        return {}

    def _bar_label(self) -> str:
        return "cross-validation"


def fold_size(rows: int, folds: int, fold: int) -> int:
    """Rows in fold `fold` (1-based): the eval rows of that fold's run."""
    from nbtune.data.splits import fold_bounds

    start, end = fold_bounds(rows, folds, fold)
    return end - start


# ---------------------------------------------------------------------------- training
def cross_validate(config: RunConfig, *, base: Any = None, observers: Any = (), progress: bool = False,
                   background: bool = False, on_ready: Callable[[Run], None] | None = None, resume_from: Any = None,
                   bench: Workbench) -> CrossValidation:
    """Train one run per fold of `config`'s `cv` folds, one after another, each on a view of the cached base
    (or of `base`, a (model, tokenizer) the caller loaded); see `nbtune.finetune`, which calls this for a
    config with `cv` and no `cv_fold`.

    Every fold's config, the fold count and the data are checked before any weight loads. `observers`
    watch every fold run, and `on_ready(run)` is called for each before it trains; `progress=True` adds
    a step bar per fold to the bar over folds. A Stop on a fold run (or `cv.stop()`) ends the
    cross-validation after that fold (the result is then incomplete). A fold that raises is recorded
    failed (and warned about) and the others go on. An interrupt keeps the folds trained so far in
    `nbtune.runs` and raises `RunInterrupted` (its `.cross_validation` holds them, as does
    `nbtune.cross_validations[name]`). `config` is parsed (the workbench parses what a user gives).
    """
    _refuse_unsupported(config, background, resume_from)
    folds = fold_configs(config)
    rows = _rows_checked(folds[0])  # fold count, format and metrics: before any weight loads
    watchers = list(observers) if isinstance(observers, Iterable) else [observers]  # each fold gets them all
    cv = CrossValidation(config, folds, rows=rows, bench=bench, base=base, observers=watchers, progress=progress,
                         on_ready=on_ready)
    bench.cross_validations[cv.name] = cv  # by name: how a cell that raised (an interrupt) still reaches it
    return cv.start(background=False)


def fold_configs(config: RunConfig) -> list[RunConfig]:
    """One config per fold: `cv_fold: i`, name `<name>-fold<i>`, and `<output_dir>-fold<i>` when the user
    chose a folder (else the default runs/<name>-fold<i>). Parsed now, so a name or folder a fold cannot
    have is refused before anything trains."""
    out = []
    for fold in range(1, config.cv + 1):
        changes: dict[str, Any] = {"cv_fold": fold, "name": f"{config.name}-fold{fold}"}
        if config.output_dir:
            changes["output_dir"] = str(config.output_dir).rstrip(SEPARATORS) + f"-fold{fold}"
        out.append(config.with_changes(**changes))
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
