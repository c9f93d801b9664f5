"""The kernel's workbench: base models loaded once, and every run by name.

A notebook re-runs cells. Training a second run, or the same cell again, must neither reload the base
(seconds, and hundreds of MB) nor stack a new adapter on top of an old one (plain peft's known pain).
So the workbench keeps one pristine base per (model, quantization, dtype) and gives every run its own
*view* of it: a copy of the module tree whose frozen weight tensors are the base's own, shared, not
copied. An adapter method injects its layers into the view; the base never sees them, re-running a
name simply drops the old view, and k adapters cost the base once plus k adapters. Methods that train
base weights in place (full, freeze, bitfit, PiSSA's init) get a real copy, at their real memory cost.

    >>> bench = Workbench()                                 # doctest: +SKIP
    >>> bench.finetune({"name": "a", "steps": 20})          # doctest: +SKIP
    >>> bench.runs                                          # doctest: +SKIP
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbtune.config import RunConfig
from nbtune.engine.bases.kernel_cache import use_kernel_bases
from nbtune.engine.bases.loading import Base, as_base, load_base, shared_view, tokenizer_view
from nbtune.engine.experiments.groups import Group, kind_of
from nbtune.engine.records.run import Run, failure_recorded
from nbtune.engine.records.text import cell
from nbtune.engine.training.pipeline import resume_in_background, start_run, train_run
from nbtune.engine.training.session import in_background, not_resumable
from nbtune.errors import NbtuneError
from nbtune.methods import get_method

if TYPE_CHECKING:
    from nbtune.engine.experiments.crossval import CrossValidation
    from nbtune.engine.experiments.sweep import Sweep


class Runs(dict):
    """Runs by name, printable as a table (status and key metrics)."""

    def table(self) -> list[dict[str, Any]]:
        rows = []
        for name, run in self.items():
            m = run.metrics
            rows.append({"name": name, "method": run.method.name, "status": run.status,
                         "steps": f"{run.history[-1]['step'] if run.history else 0}/{run.total_steps}",
                         "train_loss": m.get("train_loss"), "eval_loss": m.get("eval_loss"),
                         "exact_match": m.get("exact_match"), "trainable_%": m.get("trainable_percent")})
        return rows

    def __repr__(self) -> str:
        rows = self.table()
        if not rows:
            return "no runs yet"
        header = list(rows[0])
        lines = ["  ".join(f"{h:<14}" for h in header)]
        for row in rows:
            lines.append("  ".join(f"{cell(row[h]):<14}" for h in header))
        return "\n".join(lines)


@dataclass(frozen=True)
class Background:
    """A thread of the workbench's and what it trains: a `Run` or a group of runs (a sweep, say). The
    workbench knows its threads by what they train, never by their names."""

    thread: threading.Thread
    trains: Run | Group

    def busy(self) -> str:
        """Why nothing else may train now, and how to stop or wait for what does."""
        if isinstance(self.trains, Group):  # a sweep, a cross-validation: found by name in its registry
            group = self.trains
            return (f"{group.kind} {group.name!r} is still running in the background; stop it "
                    f"({group.registry}[{group.name!r}].stop()) or wait for it (.wait()) first.")
        return (f"run {self.trains.name!r} is still training in the background; stop it "
                f"(nbtune.runs[{self.trains.name!r}].stop()) or wait for it (.wait()) first.")


class Workbench:
    """Bases by (model, quantization, dtype) and runs by name, for one kernel."""

    def __init__(self) -> None:
        self.bases: dict[tuple[str, str, str, bool], Base] = {}
        self.runs = Runs()
        self._background: list[Background] = []  # its threads, each with what it trains
        # Groups of runs by name, registered once their checks passed (a sweep's once its study opens):
        # `nbtune.sweeps[name]`, `nbtune.cross_validations[name]` are how a cell that raised (an interrupt)
        # still reaches its group, to resume a sweep or read what a cross-validation kept.
        self.sweeps: dict[str, Sweep] = {}
        self.cross_validations: dict[str, CrossValidation] = {}

    def base(self, config: RunConfig) -> Base:
        """The cached pristine base for this config, loaded on first use."""
        return self.base_for(config.model, quantization=str(config.quantization), dtype=config.dtype,
                             trust_remote_code=config.trust_remote_code)

    def base_for(self, model: str, *, quantization: str, dtype: str, trust_remote_code: bool) -> Base:
        """The cached pristine base of `model` as loaded (quantization, dtype), loaded on first use."""
        key = (model, quantization, dtype, trust_remote_code)
        if key not in self.bases:
            self.bases[key] = load_base(model, quantization=quantization, dtype=dtype,
                                        trust_remote_code=trust_remote_code)
        return self.bases[key]

    def view_for(self, config: RunConfig, *, base: Any = None) -> Base:
        """A model for one run: a weight-sharing view of the cached base (or of `base`, a (model, tokenizer)
        the caller loaded), or a real copy if weights train."""
        base = self.base(config) if base is None else as_base(base)
        method = get_method(config.method)
        # k-bit preparation casts the unquantized weights to fp32 in place: only harmless if they already are.
        casts = config.quantization != "none" and config.dtype != "float32"
        shares = method.keeps_base(config.options) and not casts
        model = shared_view(base.model) if shares else copy.deepcopy(base.model)
        return Base(model=model, tokenizer=tokenizer_view(base.tokenizer), name=base.name,
                    quantization=base.quantization, path=base.path)

    def finetune(self, config: RunConfig | dict[str, Any] | str | None = None, *, base: Any = None,
                 observers: Any = (), progress: bool = False, background: bool = False,
                 on_ready: Callable[[Any], None] | None = None, resume_from: str | Path | None = None,
                 **overrides: Any) -> Run | CrossValidation | Sweep:
        """Train a run on a view of the cached base (or on `base`, a (model, tokenizer) the caller loaded);
        a run of the same name is replaced, never stacked. See `nbtune.finetune` for the arguments.

        `on_ready(run)` is called once the config and data passed their checks, before any weight moves
        (the notebook shows its panel then, so a typo never leaves an empty panel behind). What the config
        trains is `kind_of(config)` (engine/experiments/groups.py): a config with `cv` and no `cv_fold` is a
        cross-validation, one run per fold (engine/experiments/crossval.py), `on_ready` called for each; a
        config with `sweep` is a hyperparameter search, one run per trial (engine/experiments/sweep.py),
        `on_ready(sweep)` called once, before any trial.
        """
        self.refuse_while_training()
        config = RunConfig.parse(config, **overrides)  # parsed once: an unnamed run keeps the name it gets here
        kind = kind_of(config)
        if kind == "sweep":
            return self._sweep(config, base=base, observers=observers, progress=progress, background=background,
                               on_ready=on_ready, resume_from=resume_from)
        if kind == "cross-validation":
            from nbtune.engine.experiments.crossval import cross_validate

            return cross_validate(config, base=base, observers=observers, progress=progress, background=background,
                                  on_ready=on_ready, resume_from=resume_from, bench=self)
        run = start_run(config, observers=observers, progress=progress)  # checks config and data
        old = self.runs.get(run.name)
        self.runs[run.name] = run
        if on_ready is not None:
            on_ready(run)
        if not background:
            return self._train(run, old, base, resume_from)
        self.track(run, in_background(run, lambda: self._train(run, old, base, resume_from)))
        return run

    def _sweep(self, config: RunConfig, *, resume_from: str | Path | None, **how: Any) -> Sweep:
        from nbtune.engine.experiments.sweep import run_sweep
        from nbtune.errors import ConfigError

        if resume_from is not None:
            raise ConfigError("`resume_from` continues one run; a sweep continues by itself: run the same config "
                              "again, or sweep.resume().", field="sweep")
        return run_sweep(config, bench=self, **how)

    def _train(self, run: Run, old: Run | None, base: Any = None, resume_from: str | Path | None = None) -> Run:
        """Train `run`. The earlier run of its name is let go once the new one has trained a step; until
        then (a mistake found while loading, an interrupt) it stays, as if the new run never happened."""
        rebuild = None if base is not None else (lambda: self.view_for(run.config))  # a resume after reclaim
        try:
            with failure_recorded(run):  # loading the base may fail before the pipeline starts
                view = base if base is not None else self.view_for(run.config)
            return train_run(run, base=view, resume_from=resume_from, rebuild_base=rebuild)
        finally:
            self._settle(run, old)

    def _settle(self, run: Run, old: Run | None) -> None:
        if run.history:
            if old is not None and old is not run:
                old.model = None  # the previous view, and its adapter, can go
        elif self.runs.get(run.name) is run:  # nothing trained: the kernel's runs are as they were
            if old is not None:
                self.runs[run.name] = old
            else:
                del self.runs[run.name]

    def resume(self, name: str, *, observers: list[Any] | None = None, background: bool = False,
               on_ready: Callable[[Run], None] | None = None) -> Run:
        """Continue the stopped run `name` where it stopped, watched by `observers` (this cell's panel)."""
        self.refuse_while_training()
        if name not in self.runs:
            raise NbtuneError(f"there is no run {name!r} to resume; runs: {', '.join(self.runs) or 'none'}.")
        run = self.runs[name]
        refusal = not_resumable(run)
        if refusal:
            raise NbtuneError(refusal)
        if observers is not None:
            run.observe(*observers, replace=True)
        if on_ready is not None:
            on_ready(run)
        if not background:
            return run.resume()
        self.track(run, resume_in_background(run))
        return run

    def track(self, trains: Run | Group, thread: threading.Thread) -> None:
        """Keep `thread`, which trains `trains` (a run, or a group's children): while it lives, nothing else
        trains here, and the refusal names what does and how to stop it."""
        self._background = [b for b in self._background if b.thread.is_alive()]  # the ended ones go
        self._background.append(Background(thread, trains))

    def refuse_while_training(self) -> None:
        """Raise while a thread of this workbench trains, unless it is the caller's own: a background group's
        thread trains its children through this workbench."""
        for job in self._background:
            if job.thread.is_alive() and job.thread is not threading.current_thread():
                raise NbtuneError(job.busy())

    def forget(self, name: str) -> None:
        """Drop a run and its model from the kernel."""
        run = self.runs.pop(name)
        run.model = None


WORKBENCH = Workbench()  # the kernel's one workbench; `nbtune.runs` is its runs
# Scoring and reopening reach the kernel's bases through bases/kernel_cache.py; looked up at call time, so a
# replaced WORKBENCH (a test's fresh one) is the one asked.
use_kernel_bases(lambda model, **how: WORKBENCH.base_for(model, **how),
                 lambda config: WORKBENCH.view_for(config))


def finetune(config: RunConfig | dict[str, Any] | str | None = None, *, base: Any = None, observers: Any = (),
             progress: bool = False, background: bool = False, resume_from: str | Path | None = None,
             **overrides: Any) -> Run | CrossValidation | Sweep:
    """Fine-tune a model as `config` says (a RunConfig, dict, YAML text or file; keyword overrides win).

    The run joins `nbtune.runs` (replacing one of the same name) and trains on a view of the base this
    process has cached, as a `%%finetune` cell does; `base`, an already loaded (model, tokenizer), is
    trained instead (PEFT methods add their adapter to it in place). `observers` receive the run's events;
    `progress=True` adds a tqdm bar; `background=True` trains on a thread and returns at once.
    `resume_from="latest"` (or a checkpoint folder) continues a run whose process died, from the newest
    verified checkpoint `checkpoint_steps` left in `<output_dir>-checkpoints`.
    Returns the `Run`, finished or stopped. A failed run raises; an interrupt (Ctrl-C, the kernel's ■)
    keeps the stopped run in `nbtune.runs` and raises `RunInterrupted`, a KeyboardInterrupt.
    With `cv: k` (and no `cv_fold`) it cross-validates: k runs `<name>-fold<i>`, each evaluated on one fold
    of `data`, on the one cached base; returns a `CrossValidation` (each fold, mean +- std of every metric;
    see nbtune/engine/experiments/crossval.py). With `sweep: {...}` it searches hyperparameters: one run per trial,
    `<name>/<number>`, on the one cached base; returns a `Sweep` (see nbtune/engine/experiments/sweep.py).
    """
    return WORKBENCH.finetune(config, base=base, observers=observers, progress=progress, background=background,
                              resume_from=resume_from, **overrides)
