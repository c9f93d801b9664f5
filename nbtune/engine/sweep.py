"""Hyperparameter sweeps: a config's `sweep:` block searched with Optuna, every trial an ordinary run on the
one cached base (no reload), named `<sweep>/<number>`.

    >>> sweep = nbtune.finetune(name="dates", steps=40, eval_split=0.2,           # doctest: +SKIP
    ...                         sweep={"lr": {"log_uniform": [1e-4, 3e-3]}, "r": [4, 8, 16], "trials": 12})
    >>> sweep.best, sweep.trials                 # the best finished trial's record; a DataFrame of all
    >>> print(sweep.to_cell())                   # the best config as a %%finetune cell

Trials join `nbtune.runs` and save to runs/<sweep>/<number> (or <output_dir>/<number>). The study is
runs/<sweep>/study.db (or the block's `storage:` URL): a sweep run again, or `resume()`d, continues until
`trials` trials are done, an interrupted trial's params first. Only the best `keep_models` trials keep their
models; a failed trial is recorded and the sweep goes on. With a pruner, a trial that would evaluate only at
its end evaluates every steps/5 steps. The block is checked in engine/sweep_space.py, the study kept in
engine/sweep_study.py.

Sweep observers (the notebook's panel) get, each method only if they have it, `on_sweep_start(sweep)`,
`on_trial_start(sweep, run, params)` (before the trial trains; they watch its run's own events too),
`on_trial_end(sweep, record)` and `on_sweep_end(sweep)`; one that raises is warned about, never fatal.
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbtune.config import RunConfig
from nbtune.engine import sweep_study as st
from nbtune.engine.sweep_space import SweepSpec, check_sweep_spec, trial_config
from nbtune.engine.text import cell
from nbtune.errors import ConfigError, NbtuneError, NbtuneWarning, RunInterrupted

if TYPE_CHECKING:
    from nbtune.engine.result import Run
    from nbtune.engine.workbench import Workbench

SEPARATORS = "/\\"


class Sweep:
    """A hyperparameter search: its trials' `records` (plain dicts), their `runs` in this kernel, the Optuna
    `study`, `best`, a `trials` DataFrame, `to_cell()`, `resume()`, `stop()`, `compare()`."""

    def __init__(self, config: RunConfig, spec: SweepSpec, *, bench: Workbench, base: Any = None,
                 observers: Iterable[Any] = (), progress: bool = False) -> None:
        self.config, self.spec, self.bench, self.base = config, spec, bench, base
        self.observers, self.progress = list(observers), progress
        self.records: list[dict[str, Any]] = []  # the study's told trials, in order: see sweep_study.record_of
        self.runs: dict[int, Run] = {}  # trial number -> its run, for the trials this kernel holds
        self.ran_here: list[int] = []  # the trials this process tried (others may share the study)
        self.status = "running"  # running, finished, stopped or failed
        self.error: str | None = None
        self.study: Any = None  # the optuna.Study, opened once the config passed its checks
        self._stop = threading.Event()
        self._current: Run | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ what the panel reads
    @property
    def name(self) -> str:
        return str(self.config.name)

    @property
    def objective(self) -> str:
        return self.spec.objective

    @property
    def direction(self) -> str:
        return self.spec.direction

    @property
    def planned(self) -> int:
        return self.spec.trials

    @property
    def params(self) -> list[str]:
        return self.spec.names

    @property
    def best(self) -> dict[str, Any] | None:
        """The record of the best finished trial (Optuna's rule: pruned trials' values are intermediate)."""
        done = [r for r in self.records if r["status"] == "finished" and _finite(r["value"])]
        if not done:
            return None
        pick = min if self.direction == "minimize" else max
        return pick(done, key=lambda r: r["value"])

    @property
    def best_run(self) -> Run | None:
        """The best trial's run, while this kernel holds it (None for a trial another process ran)."""
        best = self.best
        return None if best is None else self.runs.get(best["number"]) or self.bench.runs.get(best["name"])

    # ------------------------------------------------------------------ views
    @property
    def trials(self) -> Any:
        """A pandas DataFrame: number, status, each swept setting, the objective (by its metric's name), steps,
        seconds and run name, a row per trial."""
        import pandas as pd

        columns = ["number", "status", *self.params, self.objective, "steps", "seconds", "run"]
        return pd.DataFrame([_row(r, self.params, self.objective) for r in self.records], columns=columns)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready): name, objective, direction, status, planned, best, records, ran_here."""
        return {"name": self.name, "objective": self.objective, "direction": self.direction, "status": self.status,
                "planned": self.planned, "best": self.best, "error": self.error, "records": list(self.records),
                "ran_here": list(self.ran_here)}

    def to_cell(self) -> str:
        """The best trial's config as a `%%finetune <sweep>-best` cell (its YAML, without `sweep`)."""
        best = self.best
        if best is None:
            raise NbtuneError(f"sweep {self.name!r} has no finished trial yet; run it (sweep.resume()) first.")
        config = self.config_for(best["params"], f"{self.name}-best", pruning=False)
        # settings at their defaults left out: the cell says what this config chose, as a person would write it
        return f"%%finetune {config.name}\n{config.to_text(omit=('derived', 'name', 'defaults'))}"

    def config_for(self, params: dict[str, Any], suffix: str, *, pruning: bool = True) -> RunConfig:
        """The sweep's config with `params` set: a trial's (suffix: its number) or the best's ("<sweep>-best")."""
        trial = suffix.isdigit()
        name = f"{self.name}/{suffix}" if trial else suffix
        folder = None
        if self.config.output_dir:
            base = str(self.config.output_dir).rstrip(SEPARATORS)
            folder = str(Path(base) / suffix) if trial else f"{base}-best"
        return trial_config(self.config, self.spec, params, name=name, output_dir=folder, pruning=pruning)

    def compare(self) -> Any:
        """The trials this kernel holds that trained a step, side by side (`nbtune.compare`), in trial order."""
        from nbtune.kernel import compare

        return compare(*(self.runs[n] for n in sorted(self.runs) if self.runs[n].history))

    def headline(self) -> str:
        best = self.best
        said = "no finished trial" if best is None else (
            f"best {cell(best['value'])} (trial {best['number']}: "
            + ", ".join(f"{k}={cell(v)}" for k, v in best["params"].items()) + ")")
        return (f"sweep {self.name!r}: {len(self.records)} of {self.planned} trials, {self.status} · {self.direction} "
                f"{self.objective} · {said}")

    def __repr__(self) -> str:
        columns = ["number", "status", *self.params, self.objective, "steps", "seconds"]
        lines = [columns, *([cell(_row(r, self.params, self.objective)[c]) for c in columns] for r in self.records)]
        widths = [max(len(str(x)) for x in column) for column in zip(*lines, strict=True)]
        table = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip() for line in lines]
        return "\n".join([self.headline(), *(table if self.records else [])])

    def _repr_html_(self) -> str | None:
        """The static snapshot once it ended; while a background sweep runs, its text (the live panel shows it)."""
        if self.status == "running":
            return None
        from nbtune.widgets.sweep_render import sweep_snapshot_html  # the engine never imports display code at load

        return sweep_snapshot_html(self)

    # ------------------------------------------------------------------ control
    def stop(self) -> None:
        """End the sweep after the running trial's current step (thread-safe: the panel's Stop calls it); the
        finished trials stay, the stopped one is tried again by `resume()`."""
        self._stop.set()
        run = self._current
        if run is not None:
            run.stop()

    def wait(self, timeout: float | None = None) -> Sweep:
        """Block until a background sweep ends (or `timeout` seconds pass)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self

    def resume(self, *, background: bool = False) -> Sweep:
        """Continue the sweep until its study holds `trials` trials (an interrupted trial's params first)."""
        if self._thread is not None and self._thread.is_alive():
            raise NbtuneError(f"sweep {self.name!r} is still running in the background; wait for it (.wait()).")
        self.bench._refuse_while_training()
        self._stop.clear()
        return self.start(background)

    def start(self, background: bool) -> Sweep:
        if not background:
            return self._run()

        def quietly() -> None:  # the status and error say how it ended; a thread has nobody to raise to
            try:
                self._run()
            except BaseException:
                pass

        self.status = "running"
        self._thread = threading.Thread(target=quietly, daemon=True, name=f"nbtune-sweep-{self.name}")
        self.bench._threads[self.name] = self._thread
        self._thread.start()
        return self

    # ------------------------------------------------------------------ the loop
    def _run(self) -> Sweep:
        self.status, self.error = "running", None
        bar: Any = None
        with st.quiet_optuna():
            try:
                st.take_back_stale(self.study)
                self.records = st.past_records(self.study, self.name, self.spec)
                self.runs.update({r["number"]: self.bench.runs[r["name"]] for r in self.records
                                  if r["number"] not in self.runs and r["name"] in self.bench.runs})
                self._emit("on_sweep_start", self)
                bar = self._bar()
                while not self._stop.is_set() and len(st.counted(self.study)) < self.planned:
                    record = self._trial()
                    if record is not None:
                        bar.update(1)
                        bar.set_postfix({f"trial {record['number']}": f"{record['status']} {cell(record['value'])}"})
                done = len(st.counted(self.study)) >= self.planned
                self.status = "finished" if done else "stopped"
                self._refresh()
            except KeyboardInterrupt as exc:  # in a trial (a RunInterrupted) or between two
                self.status = "stopped"
                raise self._interrupted(exc) from None
            except BaseException as exc:
                self.status = "failed"
                self.error = str(exc) if isinstance(exc, NbtuneError) else f"{type(exc).__name__}: {exc}"
                raise
            finally:
                if bar is not None:
                    bar.close()
                self._emit("on_sweep_end", self)
        return self

    def _refresh(self) -> None:
        """The records as the study holds them now, with the trials other processes told meanwhile; this
        session's stopped trial (to be tried again) stays where it was."""
        stopped = [r for r in self.records if r["status"] == "stopped"]
        told = st.past_records(self.study, self.name, self.spec)
        self.records = sorted([*told, *stopped], key=lambda r: r["number"])

    def _bar(self) -> Any:
        """A bar over the trials, unless an observer (the panel) shows the sweep and `progress` is off."""
        from tqdm.auto import tqdm

        from nbtune.engine.distributed import is_main_process

        shown = self.progress or not any(hasattr(o, "on_sweep_start") for o in self.observers)
        return tqdm(total=self.planned, initial=len(self.records), desc=f"sweep {self.name}", unit="trial",
                    disable=not (shown and is_main_process()))

    def _trial(self) -> dict[str, Any] | None:
        """Ask, train and tell one trial; its record (None when another process took its place)."""
        trial = self.study.ask()
        trial.set_user_attr("owner", st.owner())
        try:
            params = st.suggest(trial, self.spec)
            if st.surplus(self.study, trial, self.planned):
                return None
            pruning = st.PruneOnEval(trial) if self.spec.pruner != "none" else None
            started = time.perf_counter()
            try:
                run = self._train(self.config_for(params, str(trial.number)), trial.number, params, pruning)
            except Exception as exc:  # a failed trial is a result: the sweep goes on
                said = str(exc) if isinstance(exc, NbtuneError) else f"{type(exc).__name__}: {exc}"
                return self._told(trial, None, started, "FAIL", error=said)
        except KeyboardInterrupt as exc:
            self._abandoned(trial, getattr(exc, "run", None) or self.runs.get(trial.number), "interrupted")
            raise
        return self._settle(trial, run, pruning, started)

    def _train(self, config: RunConfig, number: int, params: dict[str, Any], pruning: Any) -> Run:
        def ready(run: Run) -> None:  # checked and pending: before it trains
            self.runs[number] = self._current = run
            if self._stop.is_set():  # a Stop that came between two trials
                run.stop()
            self._emit("on_trial_start", self, run, params)

        view = None if self.base is None else self.bench.view_for(config, base=self.base)  # fresh per trial
        watchers = [*self.observers, *([pruning] if pruning is not None else [])]
        try:
            return self.bench.finetune(config, base=view, observers=watchers, progress=self.progress,
                                       on_ready=ready)
        finally:
            self._current = None

    def _settle(self, trial: Any, run: Run, pruning: Any, started: float) -> dict[str, Any] | None:
        if run.status == "failed":  # diverged: finetune returns it, failed, with its reason
            return self._told(trial, run, started, "FAIL", error=run.error)
        if run.status == "stopped" and pruning is not None and pruning.pruned:
            return self._told(trial, run, started, "PRUNED")
        if run.status == "stopped":  # the sweep's Stop, or the trial's own: the sweep ends, the trial is redone
            self._stop.set()
            return self._abandoned(trial, run, "stopped")
        value = run.metrics.get(self.objective)
        if not _finite(value):
            return self._told(trial, run, started, "FAIL", error=f"the run reported no finite {self.objective} "
                                                                 f"({value!r})")
        return self._told(trial, run, started, "COMPLETE", value=float(value))

    def _told(self, trial: Any, run: Run | None, started: float, state: str, *, value: float | None = None,
              error: str | None = None) -> dict[str, Any]:
        import optuna

        said = {"error": error, "steps": _steps(run), "seconds": round(time.perf_counter() - started, 2)}
        for key, attr in said.items():  # kept in the study: a later process shows the same records
            if attr is not None:
                trial.set_user_attr(key, attr)
        frozen = self.study.tell(trial, value, state=optuna.trial.TrialState[state])
        return self._recorded(st.record_of(frozen, self.name, self.spec))

    def _abandoned(self, trial: Any, run: Run | None, why: str) -> dict[str, Any]:
        frozen = st.abandon(self.study, trial, dict(trial.params), error=why, steps=_steps(run))
        return self._recorded(st.record_of(frozen, self.name, self.spec, status="stopped"))

    def _recorded(self, record: dict[str, Any]) -> dict[str, Any]:
        self.records.append(record)  # before on_trial_end: the panel redraws from sweep.records
        self.ran_here.append(record["number"])
        self._release_models()  # before it too: an observer sees the memory the sweep holds from now on
        self._emit("on_trial_end", self, record)
        return record

    def _release_models(self) -> None:
        """Only the best `keep_models` finished trials keep their models; every other trial gives its back."""
        finished = [r for r in self.records if r["status"] == "finished" and r["number"] in self.runs]
        finished.sort(key=lambda r: r["value"], reverse=self.direction == "maximize")
        kept = {r["number"] for r in finished[: self.spec.keep_models]}
        for number, run in self.runs.items():
            if number not in kept and run.model is not None and run.status not in ("pending", "running"):
                run.release_model()

    def _interrupted(self, exc: BaseException) -> RunInterrupted:
        done = sum(r["status"] != "stopped" for r in self.records)
        error = RunInterrupted(f"sweep {self.name!r} was interrupted with {done} of {self.planned} trials done (in "
                               f"nbtune.runs as {self.name}/<number>); sweep.resume(), or running the same config "
                               "again, continues it (the interrupted trial's params first).",
                               getattr(exc, "run", None))
        error.sweep = self  # type: ignore[attr-defined]
        return error

    def _emit(self, event: str, *args: Any) -> None:
        for observer in list(self.observers):
            handler = getattr(observer, event, None)
            if handler is None:
                continue
            try:
                handler(*args)
            except Exception as exc:  # a broken display must not end a sweep of many trials
                warnings.warn(f"observer {type(observer).__name__}.{event} failed: {exc!r}", NbtuneWarning,
                              stacklevel=2)


# ---------------------------------------------------------------------------- starting one
def run_sweep(config: RunConfig | dict[str, Any] | str, *, bench: Workbench, base: Any = None, observers: Any = (),
              progress: bool = False, background: bool = False,
              on_ready: Callable[[Sweep], None] | None = None) -> Sweep:
    """Search `config`'s `sweep:` block: every setting and value is checked, the data read and the study opened
    before any weight loads; then `on_ready(sweep)` (the notebook shows its panel), then the trials, on a
    thread with `background=True` (the panel's Stop then works). `observers`: see the module docstring;
    `progress=True` adds each trial's step bar under the bar over trials. Returns the `Sweep`; an interrupt
    raises `RunInterrupted` (its `.sweep` holds the trials so far)."""
    config = RunConfig.parse(config)
    if config.sweep is None:
        raise ConfigError("this config has no `sweep:` block; add one, e.g. sweep: {r: [4, 8, 16]}.", field="sweep")
    spec = check_sweep_spec(config.sweep, config)
    watchers = list(observers) if isinstance(observers, Iterable) else [observers]
    sweep = Sweep(config, spec, bench=bench, base=base, observers=watchers, progress=progress)
    _check_trials(sweep)
    with st.quiet_optuna():
        sweep.study = st.open_study(config, spec)
    if on_ready is not None:
        on_ready(sweep)
    return sweep.start(background)


def _check_trials(sweep: Sweep) -> None:
    """Every listed value and every bound parsed into a trial's config (cross-checks between settings
    included), and one trial's data read and its metrics tried on it: all before any weight loads."""
    from nbtune.engine.run import start_run

    for d in sweep.spec.dimensions:
        for value in d.checked_values():
            try:
                sweep.config_for({d.name: value}, "0")
            except NbtuneError as exc:
                raise ConfigError(f"`sweep.{d.name}: {value!r}`: {exc}", field="sweep") from None
    start_run(sweep.config_for({d.name: d.checked_values()[0] for d in sweep.spec.dimensions}, "0"))


def _row(record: dict[str, Any], params: list[str], objective: str) -> dict[str, Any]:
    return {"number": record["number"], "status": record["status"],
            **{p: record["params"].get(p) for p in params}, objective: record["value"], "steps": record["steps"],
            "seconds": record["seconds"], "run": record["name"]}


def _steps(run: Run | None) -> int:
    return run.history[-1]["step"] if run is not None and run.history else 0


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
