"""Hyperparameter sweeps: a config's `sweep:` block searched with Optuna, every trial an ordinary run on the
one cached base (no reload), named `<sweep>/<number>`.

    >>> sweep = nbtune.finetune(name="dates", steps=40, eval_split=0.2,           # doctest: +SKIP
    ...                         sweep={"lr": {"log_uniform": [1e-4, 3e-3]}, "r": [4, 8, 16], "trials": 12})
    >>> sweep.best, sweep.trials                 # the best finished trial's record; a DataFrame of all
    >>> print(sweep.to_cell())                   # the best config as a %%finetune cell

Trials join `nbtune.runs` and save to runs/<sweep>/<number> (or <output_dir>/<number>); the sweep itself is
`nbtune.sweeps[<sweep>]`. The study is runs/<sweep>/study.db (or the block's `storage:` URL): the same sweep
run again, or `resume()`d, continues until `trials` trials are done, an interrupted trial's params first; a
sweep whose settings, data or block changed starts a new study, the old one moved aside with its trials
(runs/<sweep>~1), or in a shared storage is refused. Only the best `keep_models` trials keep their models; a
failed trial is recorded and the sweep goes on; a pruned one is a run of status "pruned" (never resumed).
With a pruner, a trial that would evaluate only at its end evaluates every steps/5 steps. The block is
checked in config/sweep_space.py, the study kept in sweep_study.py; sweep_views.py is what a Sweep shows,
sweep_config.py a trial's config and what a stored study must match.

A sweep is a group of runs (engine/experiments/groups.py, as a cross-validation is): the loop over trials,
the bar, Stop, the interrupt and a failed trial are handled there alike for both. Sweep observers (the
notebook's panel) get, each method only if they have it, `on_sweep_start(sweep)`,
`on_trial_start(sweep, run, params)` (before the trial trains; they watch its run's own events too),
`on_trial_end(sweep, record)` and `on_sweep_end(sweep)`; one that raises is warned about, never fatal.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbtune.config import RunConfig
from nbtune.config.sweep_space import SweepSpec
from nbtune.engine.experiments import sweep_study as st
from nbtune.engine.experiments.groups import Child, said
from nbtune.engine.experiments.sweep_config import study_fingerprint
from nbtune.engine.experiments.sweep_views import SweepViews, done_trials, finite
from nbtune.engine.records.text import cell
from nbtune.errors import ConfigError, NbtuneError, RunInterrupted

if TYPE_CHECKING:
    from nbtune.engine.records.run import Run
    from nbtune.engine.workbench import Workbench


class Sweep(SweepViews):
    """A hyperparameter search: its trials' `records` (plain dicts), their `runs` in this kernel, the Optuna
    `study`, `best`, a `trials` DataFrame, `to_cell()`, `resume()`, `stop()`, `compare()`. A group of runs
    (engine/experiments/groups.py: the loop, the bar, Stop, interrupt and failure handling) whose children are
    its trials; this class says what a trial is and how its outcome is told to the study (the reading half is
    engine/experiments/sweep_views.py)."""

    kind, event, unit, registry = "sweep", "sweep", "trial", "nbtune.sweeps"

    def __init__(self, config: RunConfig, spec: SweepSpec, *, bench: Workbench, base: Any = None,
                 observers: Iterable[Any] = (), progress: bool = False) -> None:
        super().__init__(config, bench=bench, base=base, observers=observers, progress=progress)
        self.spec = spec
        self.records: list[dict[str, Any]] = []  # the study's told trials, in order: see sweep_study.record_of
        self.runs: dict[int, Run] = {}  # trial number -> its run, for the trials this kernel holds
        self.ran_here: list[int] = []  # the trials this process tried (others may share the study)
        self.study: Any = None  # the optuna.Study, opened once the config passed its checks
        self.moved_to: Path | None = None  # where its study went when a sweep of its name but another config ran
        self.fingerprint: dict[str, Any] = {}  # what its study must match (sweep_config.study_fingerprint)

    # ------------------------------------------------------------------ control
    def resume(self, *, background: bool = False) -> Sweep:
        """Continue the sweep until its study holds `trials` trials (an interrupted trial's params first)."""
        if self.training_in_background:
            raise NbtuneError(f"sweep {self.name!r} is still running in the background; wait for it (.wait()).")
        with st.quiet_optuna():
            found = st.stored_study(self.config, self.spec)
        if self.moved_to is not None:  # its study's old place holds the newer sweep's study now
            raise NbtuneError(f"sweep {self.name!r} was set aside when a sweep of its name with another config "
                              f"started; its study and trials are kept in {str(self.moved_to)!r}. Run this config "
                              "under another name to start it again.")
        if found is None or found[1] != self.fingerprint:  # deleted, or set aside by another kernel
            where = self.spec.storage or str(self.config.resolved_output_dir)
            raise NbtuneError(f"sweep {self.name!r}: its study is gone from {where!r} or is now another sweep's; "
                              "run its cell again to start it anew.")
        self.bench.refuse_while_training()
        self._stop.clear()
        return self.start(background)

    # ------------------------------------------------------------------ the strategy (groups.Group)
    def _run(self) -> Sweep:
        with st.quiet_optuna():  # Optuna's per-trial INFO lines: the panel, the bar and the records say it
            return super()._run()

    def _begin(self) -> int:
        st.take_back_stale(self.study)
        self.records = st.past_records(self.study, self.name, self.spec)
        self.runs.update({r["number"]: self.bench.runs[r["name"]] for r in self.records
                          if r["number"] not in self.runs and r["name"] in self.bench.runs})
        return len(self.records)  # the trials an earlier session of this study already told

    def _wanted(self) -> bool:
        return len(st.counted(self.study)) < self.planned

    def _next(self) -> Child | None:
        """Ask the study for a trial and its params; None when another process took its place."""
        trial = self.study.ask()
        trial.set_user_attr("owner", st.owner())
        try:
            params = st.suggest(trial, self.spec)
            if st.surplus(self.study, trial, self.planned):
                return None
        except KeyboardInterrupt:
            self._recorded(self._abandoned(trial, self.runs.get(trial.number), "interrupted"))
            raise
        pruning = st.PruneOnEval(trial) if self.spec.pruner != "none" else None
        return Child(number=trial.number, params=params, observers=[pruning] if pruning is not None else [],
                     about=(trial, pruning))

    def _child_config(self, child: Child) -> RunConfig:
        return self.config_for(child.params, str(child.number))

    def _ready(self, child: Child, run: Run) -> None:
        self.runs[child.number] = run

    def _ended(self, child: Child, run: Run) -> dict[str, Any]:
        trial, pruning = child.about
        if run.status == "failed":  # diverged: finetune returns it, failed, with its reason
            return self._told(trial, run, child.started, "FAIL", error=run.error)
        if run.status == "stopped" and pruning is not None and pruning.pruned:
            _mark_pruned(run)
            return self._told(trial, run, child.started, "PRUNED")
        if run.status == "stopped":  # the sweep's Stop, or the trial's own: the sweep ends, the trial is redone
            return self._abandoned(trial, run, "stopped")
        value = run.metrics.get(self.optimize)
        if not finite(value):
            return self._told(trial, run, child.started, "FAIL",
                              error=f"the run reported no finite {self.optimize} ({value!r})")
        return self._told(trial, run, child.started, "COMPLETE", value=float(value))

    def _failed(self, child: Child, error: Exception) -> dict[str, Any]:
        trial, _ = child.about
        return self._told(trial, None, child.started, "FAIL", error=said(error))

    def _cut_short(self, child: Child, run: Run | None) -> dict[str, Any]:
        trial, _ = child.about
        return self._abandoned(trial, run or self.runs.get(child.number), "interrupted")

    def _settled(self) -> None:
        """The records as the study holds them now, with the trials other processes told meanwhile; this
        session's stopped trial (to be tried again) stays where it was."""
        stopped = [r for r in self.records if r["status"] == "stopped"]
        told = st.past_records(self.study, self.name, self.spec)
        self.records = sorted([*told, *stopped], key=lambda r: r["number"])

    def _postfix(self, record: dict[str, Any]) -> dict[str, str]:
        return {f"trial {record['number']}": f"{record['status']} {cell(record['value'])}"}

    def _interrupted(self, exc: BaseException) -> RunInterrupted:
        done = done_trials(self.records)
        # The cell raised, so it returned no Sweep to call resume() on: nbtune.sweeps holds it
        error = RunInterrupted(f"sweep {self.name!r} was interrupted with {done} of {self.planned} trials done (in "
                               f"nbtune.runs as {self.name}/<number>); {self.registry}[{self.name!r}].resume(), or "
                               "running the same cell or config again, continues it (the interrupted trial's "
                               "params first).", getattr(exc, "run", None))
        error.sweep = self  # type: ignore[attr-defined]
        return error

    # ------------------------------------------------------------------ telling the study
    def _told(self, trial: Any, run: Run | None, started: float, state: str, *, value: float | None = None,
              error: str | None = None) -> dict[str, Any]:
        import optuna

        attrs = {"error": error, "steps": _steps(run), "seconds": round(time.perf_counter() - started, 2)}
        for key, attr in attrs.items():  # kept in the study: a later process shows the same records
            if attr is not None:
                trial.set_user_attr(key, attr)
        frozen = self.study.tell(trial, value, state=optuna.trial.TrialState[state])
        return self._kept(st.record_of(frozen, self.name, self.spec))

    def _abandoned(self, trial: Any, run: Run | None, why: str) -> dict[str, Any]:
        frozen = st.abandon(self.study, trial, dict(trial.params), error=why, steps=_steps(run))
        return self._kept(st.record_of(frozen, self.name, self.spec, status="stopped"))

    def _kept(self, record: dict[str, Any]) -> dict[str, Any]:
        self.records.append(record)  # before on_trial_end: the panel redraws from sweep.records
        self.ran_here.append(record["number"])
        self._release_models()  # before it too: an observer sees the memory the sweep holds from now on
        return record

    def _release_models(self) -> None:
        """Only the best `keep_models` finished trials keep their models; every other trial gives its back."""
        finished = [r for r in self.records if r["status"] == "finished" and r["number"] in self.runs]
        finished.sort(key=lambda r: r["value"], reverse=self.direction == "maximize")
        kept = {r["number"] for r in finished[: self.spec.keep_models]}
        for number, run in self.runs.items():
            if number not in kept and run.model is not None and run.status not in ("pending", "running"):
                run.release_model()


# ---------------------------------------------------------------------------- starting one
def run_sweep(config: RunConfig, *, bench: Workbench, base: Any = None, observers: Any = (),
              progress: bool = False, background: bool = False,
              on_ready: Callable[[Sweep], None] | None = None) -> Sweep:
    """Search `config`'s `sweep:` block: every setting and value is checked, the data read and the study opened
    before any weight loads; then `on_ready(sweep)` (the notebook shows its panel), then the trials, on a
    thread with `background=True` (the panel's Stop then works). `observers`: see the module docstring;
    `progress=True` adds each trial's step bar under the bar over trials. A sweep whose config changed since
    its stored study starts a new one, the old moved aside (sweep_study.set_aside_changed). Returns the
    `Sweep`, also `bench.sweeps[name]` (`nbtune.sweeps`); an interrupt raises `RunInterrupted` (its `.sweep`
    holds the trials so far)."""
    from nbtune.engine.records.provenance import data_record
    from nbtune.engine.training.session import session_of

    if config.sweep is None:  # parsed already: the workbench parses what a user gives
        raise ConfigError("this config has no `sweep:` block; add one, e.g. sweep: {r: [4, 8, 16]}.", field="sweep")
    spec = config.sweep_space  # the block as parsing checked it (config/sweep_space.py)
    watchers = list(observers) if isinstance(observers, Iterable) else [observers]
    sweep = Sweep(config, spec, bench=bench, base=base, observers=watchers, progress=progress)
    sweep.fingerprint = study_fingerprint(config, spec, data_record(*session_of(_check_trials(sweep)).data))
    with st.quiet_optuna():
        moved = st.set_aside_changed(config, spec, sweep.fingerprint)
        sweep.study = st.open_study(config, spec, sweep.fingerprint)
    if moved is not None:
        _moved_aside(bench, sweep, moved)
    bench.sweeps[sweep.name] = sweep
    if on_ready is not None:
        on_ready(sweep)
    return sweep.start(background)


def _check_trials(sweep: Sweep) -> Run:
    """Every listed value and every bound parsed into a trial's config (cross-checks between settings
    included), and one trial's data read and its metrics tried on it: all before any weight loads. Returns
    that trial's pending run (its data as read: what the study's fingerprint hashes)."""
    from nbtune.engine.training.pipeline import start_run

    for d in sweep.spec.dimensions:
        for value in d.checked_values():
            try:
                sweep.config_for({d.name: value}, "0")
            except NbtuneError as exc:
                raise ConfigError(f"`sweep.{d.name}: {value!r}`: {exc}", field="sweep") from None
    return start_run(sweep.config_for({d.name: d.checked_values()[0] for d in sweep.spec.dimensions}, "0"))


def _moved_aside(bench: Workbench, sweep: Sweep, moved: Path) -> None:
    """The kernel's sweep of that name and its trials now live in `moved`: say so where they are kept (the
    Sweep refuses to resume, each trial run's `saved_to` follows its folder)."""
    earlier = bench.sweeps.get(sweep.name)
    if earlier is not None:
        earlier.moved_to = moved
    old = sweep.config.resolved_output_dir.resolve()
    for run in bench.runs.values():
        if run.name.startswith(f"{sweep.name}/") and run.saved_to is not None:
            try:
                inside = Path(run.saved_to).resolve().relative_to(old)
            except ValueError:
                continue
            run.saved_to = moved / inside
            if "saved_to" in run.metrics:
                run.metrics["saved_to"] = str(run.saved_to)


def _mark_pruned(run: Run) -> None:
    """A trial its pruner stopped is "pruned", not "stopped": nothing of it is to be resumed (the sweep tries
    other params instead), so its training state goes, and its saved run.json says so too (history() reads
    it). The pipeline saved it as it ended, stopped; only the status changes."""
    from nbtune.engine.records.run import set_status

    set_status(run, "pruned")  # which lets its training state go
    if run.saved_to is None or not run.owns_saved_folder():
        return
    from nbtune.engine.records.run_folder import rewrite_status

    rewrite_status(run.saved_to, "pruned")  # atomic: a reader sees the stopped record or the pruned one


def _steps(run: Run | None) -> int:
    return run.history[-1]["step"] if run is not None and run.history else 0

