"""One runner for groups of runs: a cross-validation's folds and a sweep's trials are child runs, trained one
after another through the workbench, each an ordinary run in `nbtune.runs` on a view of the one cached base.

`kind_of(config)` is the one place that decides what a config trains: a single run, a cross-validation
(`cv: k` and no `cv_fold`) or a sweep (a `sweep:` block). The workbench trains by it; the `%%finetune` magic
asks it only to choose how to show what trains.

`Group` is the runner; a strategy (`CrossValidation` in crossval.py, `Sweep` in sweep.py) subclasses it and
says what differs: what the next child's config is (`_next`, `_child_config`), whether the group wants more
(`_wanted`), how an ended, failed or interrupted child is recorded (`_ended`, `_failed`, `_cut_short`), its
table (`table`, `headline`) and what an interrupt says (`_interrupted`). The runner does the rest, alike
for both:
- one progress bar over the children (engine/training/progress.py), hidden when the group trains on a
  thread or an observer shows the group itself, unless `progress=True` asks for it;
- Stop: `group.stop()` (thread-safe: a panel's button) or a child's own Stop ends the group after the
  running child's current step;
- an interrupt keeps the finished children and raises `RunInterrupted` saying where the group is kept by
  name (`nbtune.sweeps[name]`, `nbtune.cross_validations[name]`): the cell raised, so it returned nothing;
- a child that raises is recorded failed, and the group goes on;
- observer events, each only to observers that have it: `on_<group>_start(group)`,
  `on_<child>_start(group, run, params)` (before the child trains; observers watch its run's own events
  too), `on_<child>_end(group, record)` and `on_<group>_end(group)`, where <group>/<child> are sweep/trial
  or cv/fold; one that raises is warned about, never fatal;
- the group's thread (`start(background=True)`) is kept by the workbench with the group it trains.

What a group shows is plain data here (`table()`, `to_dict()`, `df`, text); its HTML is the notebook
layer's (nbtune/widgets/cv_view.py, sweep_render.py), never imported from the engine.
"""

from __future__ import annotations

import threading
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from nbtune.engine.records.text import cell
from nbtune.errors import NbtuneError, NbtuneWarning, RunInterrupted

if TYPE_CHECKING:
    from typing_extensions import Self

    from nbtune.config import RunConfig
    from nbtune.engine.records.run import Run
    from nbtune.engine.workbench import Workbench

Kind = Literal["run", "cross-validation", "sweep"]


def kind_of(config: RunConfig | Mapping[str, Any]) -> Kind:
    """What `config` trains: "sweep" (a `sweep:` block), "cross-validation" (`cv` without `cv_fold`: every
    fold), else "run" (a fold's own config, `cv_fold` set, is one run). Takes a parsed config or the raw
    mapping a cell builds (the magic decides how to show it before the workbench parses it)."""
    def get(key: str) -> Any:
        return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)

    if get("sweep") is not None:
        return "sweep"
    if get("cv") and get("cv_fold") is None:
        return "cross-validation"
    return "run"


@dataclass
class Child:
    """One child of a group while it trains: its number (a trial's, a fold's) and params (what sets it apart
    from its siblings: a trial's sampled settings, a fold's `cv_fold`), observers of its own besides the
    group's (a trial's pruner), its run once checked, and whatever else its strategy keeps (`about`)."""

    number: int
    params: dict[str, Any]
    observers: list[Any] = field(default_factory=list)
    run: Run | None = None
    started: float = field(default_factory=time.perf_counter)
    about: Any = None


class Group(ABC):
    """Child runs trained one after another on the cached base: see the module docstring. Subclasses set
    the class attributes and the strategy's methods; `status` is running, finished, stopped or failed."""

    kind = "group"  # how messages name it: "sweep", "cross-validation"
    event = "group"  # observer events on_<event>_start / _end: "sweep", "cv"
    unit = "child"  # a child's word, in events (on_<unit>_start / _end) and on the bar: "trial", "fold"
    registry = "nbtune.groups"  # where a notebook finds it by name: "nbtune.sweeps", "nbtune.cross_validations"

    def __init__(self, config: RunConfig, *, bench: Workbench, base: Any = None, observers: Iterable[Any] = (),
                 progress: bool = False) -> None:
        self.config, self.bench, self.base = config, bench, base  # base: the caller's (model, tokenizer), or None
        self.observers, self.progress = list(observers), progress
        self.status = "running"
        self.error: str | None = None
        self._stop = threading.Event()
        self._current: Run | None = None
        self._thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return str(self.config.name)

    # ------------------------------------------------------------------ what a strategy supplies
    @property
    @abstractmethod
    def planned(self) -> int:
        """How many children the group trains in all (the bar's total)."""

    def _begin(self) -> int:
        """Before the first child: set up, and say how many children are done already (the bar starts there)."""
        return 0

    @abstractmethod
    def _wanted(self) -> bool:
        """Whether the group wants another child trained; False once it is complete."""

    @abstractmethod
    def _next(self) -> Child | None:
        """The next child, or None when there is none to train this time round (the loop asks `_wanted` again)."""

    @abstractmethod
    def _child_config(self, child: Child) -> RunConfig:
        """The child's config; asked as it starts, so a config it cannot have fails that child alone."""

    @abstractmethod
    def _ready(self, child: Child, run: Run) -> None:
        """The child's run passed its checks and is about to train."""

    @abstractmethod
    def _ended(self, child: Child, run: Run) -> dict[str, Any]:
        """Record a child whose run ended (finished, stopped or diverged); its record."""

    @abstractmethod
    def _failed(self, child: Child, error: Exception) -> dict[str, Any]:
        """Record a child that raised; its record. The group goes on."""

    def _cut_short(self, child: Child, run: Run | None) -> dict[str, Any] | None:
        """Record a child an interrupt ended (`run`: its run, if it had one); its record, if any."""
        return None

    def _settled(self) -> None:
        """After the last child (or a Stop): bring the records up to date (a cross-validation's are)."""
        return None

    @abstractmethod
    def _interrupted(self, exc: BaseException) -> RunInterrupted:
        """What an interrupt raises: what was kept, and where the group is kept by name."""

    def _postfix(self, record: dict[str, Any]) -> dict[str, str]:
        """The bar's note on the child that just ended."""
        return {}

    def _bar_label(self) -> str:
        return f"{self.kind} {self.name}"

    @abstractmethod
    def table(self) -> list[dict[str, Any]]:
        """The group's table as rows of plain values: what its text and its notebook view show."""

    @abstractmethod
    def headline(self) -> str:
        """One line: what the group is and how far it got."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready): what `nbtune ... --json` prints."""

    def _text_rows(self) -> list[dict[str, Any]]:
        """The rows its text shows (default: the table)."""
        return self.table()

    @abstractmethod
    def _compared(self) -> list[Run]:
        """The runs `compare()` sets side by side."""

    # ------------------------------------------------------------------ control
    def stop(self) -> None:
        """End the group after the running child's current step (thread-safe: a panel's Stop calls it); the
        children that ended stay."""
        self._stop.set()
        run = self._current
        if run is not None:
            run.stop()

    def wait(self, timeout: float | None = None) -> Self:
        """Block until a background group ends (or `timeout` seconds pass)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self

    @property
    def training_in_background(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, background: bool) -> Self:
        """Train the children: in this thread, or on one the workbench keeps (returns at once)."""
        if not background:
            return self._run()

        def quietly() -> None:  # the status and error say how it ended; a thread has nobody to raise to
            try:
                self._run()
            except BaseException:
                pass

        self.status = "running"
        self._thread = threading.Thread(target=quietly, daemon=True, name=f"nbtune-{self.event}-{self.name}")
        self.bench.track(self, self._thread)  # the workbench knows what its thread trains: this group
        self._thread.start()
        return self

    # ------------------------------------------------------------------ the loop
    def _run(self) -> Self:
        self.status, self.error = "running", None
        bar: Any = None
        try:
            done = self._begin()
            self._emit(f"on_{self.event}_start", self)
            bar = self._bar(done)
            while not self._stop.is_set() and self._wanted():
                record = self._one()
                if record is not None:
                    bar.update(1)
                    bar.set_postfix(self._postfix(record))
            self.status = "stopped" if self._wanted() else "finished"
            self._settled()
        except KeyboardInterrupt as exc:  # in a child (a RunInterrupted) or between two
            self.status = "stopped"
            raise self._interrupted(exc) from None
        except BaseException as exc:
            self.status, self.error = "failed", said(exc)
            raise
        finally:
            if bar is not None:
                bar.close()
            self._emit(f"on_{self.event}_end", self)
        return self

    def _one(self) -> dict[str, Any] | None:
        """Train the next child and record it; its record (None when there was none to train)."""
        child = self._next()
        if child is None:
            return None
        try:
            try:
                run = self._train(child)
            except Exception as exc:  # a failed child is a result: the group goes on
                return self._recorded(self._failed(child, exc))
        except KeyboardInterrupt as exc:
            record = self._cut_short(child, getattr(exc, "run", None) or child.run)
            if record is not None:
                self._recorded(record)
            raise
        record = self._ended(child, run)
        if run.status == "stopped":  # a Stop, the group's or the child's own, ends the whole group
            self._stop.set()
        return self._recorded(record)

    def _train(self, child: Child) -> Run:
        def ready(run: Run) -> None:  # checked and pending: before it trains
            child.run = self._current = run
            if self._stop.is_set():  # a Stop that came between two children
                run.stop()
            self._ready(child, run)
            self._emit(f"on_{self.unit}_start", self, run, dict(child.params))

        config = self._child_config(child)
        # the caller's base: a fresh view per child, so no child trains on another's adapter
        view = None if self.base is None else self.bench.view_for(config, base=self.base)
        try:
            return self.bench.finetune(config, base=view, observers=[*self.observers, *child.observers],
                                       progress=self.progress, on_ready=ready)
        finally:
            self._current = None

    def _recorded(self, record: dict[str, Any]) -> dict[str, Any]:
        self._emit(f"on_{self.unit}_end", self, record)
        return record

    def _bar(self, done: int) -> Any:
        """A bar over the children, unless `progress` is off and an observer (a panel) shows the group, or the
        group trains on a thread: a bar drawn from there lands under whichever cell runs at the time (a
        background group shows itself in its own cell)."""
        from nbtune.engine.training.distributed import is_main_process  # transformers: not for `kind_of`'s sake
        from nbtune.engine.training.progress import progress_bar

        background = threading.current_thread() is self._thread
        shown_elsewhere = any(hasattr(o, f"on_{self.event}_start") for o in self.observers)
        shown = self.progress or not (background or shown_elsewhere)
        bar = progress_bar(total=self.planned, desc=self._bar_label(), unit=self.unit, leave=True,
                           disable=not (shown and is_main_process()))
        bar.update(done)
        return bar

    def _emit(self, event: str, *args: Any) -> None:
        for observer in list(self.observers):
            handler = getattr(observer, event, None)
            if handler is None:
                continue
            try:
                handler(*args)
            except Exception as exc:  # a broken display must not end a group of many runs
                warnings.warn(f"observer {type(observer).__name__}.{event} failed: {exc!r}", NbtuneWarning,
                              stacklevel=2)

    # ------------------------------------------------------------------ what it shows
    @property
    def df(self) -> Any:
        """The table as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.table())

    def compare(self) -> Any:
        """The children side by side (a `Comparison`: table, config diff, curves, answers)."""
        from nbtune.engine.evaluation.compare import Comparison

        runs = self._compared()
        if not runs:
            raise NbtuneError(f"{self.kind} {self.name!r} has no {self.unit} that trained a step to compare yet.")
        return Comparison(runs)

    def __repr__(self) -> str:
        return "\n".join([self.headline(), *text_table(self._text_rows())])


def text_table(rows: list[dict[str, Any]]) -> list[str]:
    """`rows` (dicts with the same keys) as aligned text under a header of their keys; none: no lines."""
    if not rows:
        return []
    lines = [list(rows[0]), *([cell(v) for v in row.values()] for row in rows)]
    widths = [max(len(text) for text in column) for column in zip(*lines, strict=True)]
    return ["  ".join(text.ljust(w) for text, w in zip(line, widths, strict=True)).rstrip() for line in lines]


def said(exc: BaseException) -> str:
    """An error as a record states it: nbtune's own as written, anything else with its type."""
    return str(exc) if isinstance(exc, NbtuneError) else f"{type(exc).__name__}: {exc}"
