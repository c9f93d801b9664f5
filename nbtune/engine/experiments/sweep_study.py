"""The Optuna side of a sweep (nbtune/engine/experiments/sweep.py): the durable study, its sampler and pruner, a trial's
params asked for, its outcome told, and the plain records the panel and `Sweep.trials` show.

The study lives in an Optuna storage: by default the SQLite file `<sweep folder>/study.db`, else the
`storage:` URL of the sweep block, which several processes or machines may share. A trial counts towards
`trials` once asked (running, finished, pruned or failed); a trial cut short by an interrupt or a Stop is
told FAIL with the user attribute `interrupted` and does not count: its params are queued again
(`enqueue_trial`), so the next run of the sweep tries them first. A stored study is continued only by the
same sweep (engine/experiments/sweep_config.py's fingerprint: block, fixed settings, data); one of a changed sweep moves
aside to `<sweep folder>~<n>` (`set_aside_changed`), and in a shared storage is refused.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbtune.engine.experiments.sweep_config import as_stored_now, changes, said_briefly
from nbtune.errors import ConfigError, NbtuneWarning

if TYPE_CHECKING:
    import optuna

    from nbtune.config import RunConfig
    from nbtune.config.sweep_space import SweepSpec

FINGERPRINT = "nbtune_sweep"  # the study's user attribute holding SweepSpec.fingerprint()
STATUS = {"COMPLETE": "finished", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running"}
NOT_COUNTED = ("interrupted", "surplus")  # user attributes of FAIL trials that were never really tried


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna's per-trial INFO lines off while a sweep runs (the panel, the bar and the records say it)."""
    import optuna

    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def storage_url(config: RunConfig, spec: SweepSpec) -> str:
    """The `storage:` URL, else the SQLite file study.db in the sweep's folder (made now)."""
    if spec.storage:
        return spec.storage
    folder = config.resolved_output_dir
    if (folder / "run.json").is_file():  # saving that run again would replace the folder, trials and study too
        raise ConfigError(f"{str(folder)!r} holds a saved run named {config.name!r}; a sweep's trials and study "
                          "go in its folder: give the sweep another name.", field="name")
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / 'study.db').resolve()}"  # absolute: a background thread's cwd may change


def open_study(config: RunConfig, spec: SweepSpec, fingerprint: dict[str, Any] | None = None) -> optuna.Study:
    """The sweep's study, created or loaded (`load_if_exists`): a sweep run again continues where it was.
    `fingerprint` (sweep_config.study_fingerprint; default the block's alone) is what it must match: a stored
    study with trials that differs is refused, unless `set_aside_changed` moved it aside first."""
    import optuna

    url = storage_url(config, spec)
    storage = _storage(url) if url.startswith("sqlite") else url
    study = optuna.create_study(storage=storage, study_name=str(config.name), direction=spec.direction,
                                pruner=make_pruner(spec, config), load_if_exists=True)
    wanted = json.loads(json.dumps(fingerprint or spec.fingerprint()))  # as a storage gives it back: lists
    stored = as_stored_now(study.user_attrs.get(FINGERPRINT))
    if stored != wanted:
        said = changes(stored, wanted) if stored is not None else []
        if said and study.get_trials(deepcopy=False):
            raise ConfigError(f"sweep {config.name!r} changed since its study in {url} ({said_briefly(said)}); set "
                              "it back, or give the sweep another `name`.", field="sweep")
        study.set_user_attr(FINGERPRINT, wanted)  # a new study, one with no trial yet, or an older nbtune's
    # Seeded by config.seed, so a sweep run once from scratch is repeatable; a resumed sweep, or a second
    # process joining the study, draws afresh instead of proposing the first trials' params again. Not the
    # grid: its seed shuffles the grid's points, which every process and every resume must number alike.
    joined = 0 if spec.sampler == "grid" else len(study.get_trials(deepcopy=False))
    study.sampler = make_sampler(spec, config.seed + joined)
    return study


def set_aside_changed(config: RunConfig, spec: SweepSpec, fingerprint: dict[str, Any]) -> Path | None:
    """A stored study with trials whose sweep changed (`fingerprint` differs, `changes` names how) is not
    continued. The default study in the sweep's folder moves aside with its trials, to `<folder>~<n>`, and
    the place is free for a new one (said in one line); returns where it went (None: nothing stored, or no
    change). A shared `storage:` study is refused instead: other processes may be running it."""
    found = stored_study(config, spec)
    if found is None:
        return None
    url, stored, trials = found
    said = changes(stored, json.loads(json.dumps(fingerprint))) if stored is not None and trials else []
    if not said:
        return None
    # Why not refuse: in a notebook a sweep is tuned by editing its cell and running it again; the cell
    # should then do what it now says, as a re-run %%finetune cell does, and not leave the user to rename
    # it or delete files first. Nothing is lost: the old study and its trials move aside, and say where.
    # A sweep run again unchanged (more `trials`, after an interrupt) continues its study as before.
    if spec.storage is not None:
        raise ConfigError(f"sweep {config.name!r} changed since its study in {url} ({said_briefly(said)}), which "
                          "other processes may share: set it back, give the sweep another `name`, or delete that "
                          f"study (optuna.delete_study(study_name={str(config.name)!r}, storage=...)).",
                          field="sweep")
    folder = config.resolved_output_dir
    moved = _free_place(folder)
    folder.rename(moved)
    done = sum(counts(t) for t in trials)
    warnings.warn(f"sweep {config.name!r} changed since its study ({said_briefly(said)}): a new study starts; the "
                  f"old one and its {done} trial{'s' * (done != 1)} are kept in {str(moved)!r}.", NbtuneWarning,
                  stacklevel=3)
    return moved


def stored_study(config: RunConfig, spec: SweepSpec) -> tuple[str, dict[str, Any] | None, list[Any]] | None:
    """The sweep's stored study as it is now, without making one: (its storage URL, its fingerprint, its
    trials); None when there is none yet."""
    url = spec.storage
    if url is None:
        path = config.resolved_output_dir / "study.db"
        if not path.is_file():
            return None
        url = f"sqlite:///{path.resolve()}"
    storage = _storage(url) if url.startswith("sqlite") else _other_storage(url)
    try:
        study_id = storage.get_study_id_from_name(str(config.name))
        stored = as_stored_now(storage.get_study_user_attrs(study_id).get(FINGERPRINT))
        return url, stored, storage.get_all_trials(study_id)
    except KeyError:  # no study of this name there yet
        return None
    finally:
        _close(storage)


def _free_place(folder: Path) -> Path:
    """`<folder>~1`, `~2`, ...: the first that is free. '~' is no run name's character (config.RUN_NAME), so
    no run is ever saved there."""
    number = 1
    while folder.with_name(f"{folder.name}~{number}").exists():
        number += 1
    return folder.with_name(f"{folder.name}~{number}")


def _other_storage(url: str) -> Any:
    import optuna

    return optuna.storages.get_storage(url)


def _close(storage: Any) -> None:
    """Let the storage's database connections go (the file is about to move)."""
    engine = getattr(storage, "engine", None)
    if engine is not None:
        engine.dispose()


def _storage(url: str, attempts: int = 5) -> Any:
    """Optuna's storage on a SQLite file that several processes may share: each waits for a lock another
    holds (`timeout`) instead of failing, and two processes that create the file at the same moment both
    stamp its schema version; the one that loses that race (an IntegrityError) opens it again, now made."""
    import time

    import optuna
    import sqlalchemy.exc

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
        except sqlalchemy.exc.IntegrityError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def make_sampler(spec: SweepSpec, seed: int) -> optuna.samplers.BaseSampler:
    import optuna

    if spec.sampler == "grid":
        return _grid_sampler_class()({d.name: d.encoded() for d in spec.dimensions}, seed=seed)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # TPE models good and bad trials from random ones first: a third of a short sweep, 10 at most (Optuna's
    # default, which would leave a 12-trial sweep nearly all random).
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, spec.trials // 3)))


def _grid_sampler_class() -> type:
    import optuna

    class GridSampler(optuna.samplers.GridSampler):
        """Optuna's grid, less its `after_trial`: that calls `study.stop()`, which only `study.optimize` allows
        (a RuntimeError under ask-and-tell once the grid is done), and reads a `grid_id` that an enqueued
        retry has none of (a KeyError). The sweep counts its trials itself."""

        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            pass

    return GridSampler


def make_pruner(spec: SweepSpec, config: RunConfig) -> optuna.pruners.BasePruner:
    import optuna

    if spec.pruner == "median":
        # Two finished trials make a median to compare with; no warm-up: the first evaluation point already
        # comes a fifth of the way into training (sweep_space.eval_steps_for).
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if spec.pruner == "hyperband":
        # The resource is the optimizer step at which eval_loss is reported.
        swept = "steps" in spec.names
        return optuna.pruners.HyperbandPruner(min_resource=1,
                                              max_resource="auto" if swept or not config.steps else config.steps)
    return optuna.pruners.NopPruner()


# ---------------------------------------------------------------------------- trials
def suggest(trial: optuna.Trial, spec: SweepSpec) -> dict[str, Any]:
    """One trial's params, asked of the sampler in the block's order, as its config takes them."""
    params = {}
    for d in spec.dimensions:
        if d.kind == "choice":
            params[d.name] = d.decode(trial.suggest_categorical(d.name, d.encoded()))
        elif d.integer:
            params[d.name] = trial.suggest_int(d.name, int(d.low), int(d.high), log=d.log)
        else:
            params[d.name] = trial.suggest_float(d.name, d.low, d.high, log=d.log)
    return params


def owner() -> str:
    """Which process runs a trial: '<host>:<pid>' (a trial left running by a dead one is taken back)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def counts(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether `trial` takes one of the sweep's `trials`: running, finished, pruned, or failed by itself."""
    state = trial.state.name
    if state == "FAIL":
        return not any(trial.user_attrs.get(key) for key in NOT_COUNTED)
    return state in ("COMPLETE", "PRUNED", "RUNNING")


def counted(study: optuna.Study) -> list[int]:
    """The numbers of the trials that count, in order."""
    return [t.number for t in study.get_trials(deepcopy=False) if counts(t)]


def abandon(study: optuna.Study, trial: optuna.Trial | optuna.trial.FrozenTrial, params: dict[str, Any] | None,
            why: str = "interrupted", **attrs: Any) -> optuna.trial.FrozenTrial:
    """Tell `trial` FAIL as not really tried (`why`: interrupted or surplus), and queue `params` (as the study
    stores them) to be tried again."""
    import optuna

    if isinstance(trial, optuna.trial.FrozenTrial):  # left running by a process that is gone
        trial = optuna.trial.Trial(study, trial._trial_id)  # Optuna's own way to a stored trial's attributes
    for key, value in {why: True, **attrs}.items():
        trial.set_user_attr(key, value)
    frozen = study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
    if params is not None:
        study.enqueue_trial(params, user_attrs={"retry_of": frozen.number})
    return frozen


def take_back_stale(study: optuna.Study) -> list[int]:
    """Trials left RUNNING by a process of this machine that is gone (or by this one: a sweep that ended
    without telling; one sweep trains at a time here) are abandoned, their params queued again. Those of
    other machines are left to them."""
    import psutil

    host, pid = owner().rsplit(":", 1)
    taken = []
    for t in study.get_trials(deepcopy=False):
        their_host, _, their_pid = str(t.user_attrs.get("owner", "")).rpartition(":")
        if t.state.name != "RUNNING" or their_host != host or not their_pid.isdigit():
            continue
        if their_pid == pid or not psutil.pid_exists(int(their_pid)):
            abandon(study, t, dict(t.params))
            taken.append(t.number)
    return taken


def surplus(study: optuna.Study, trial: optuna.Trial, trials: int) -> bool:
    """Whether another process took the last places while this one asked: then `trial` (the later) yields,
    told FAIL 'surplus'; a retry's params are queued again."""
    if trial.number not in counted(study)[trials:]:
        return False
    abandon(study, trial, dict(trial.params) if "retry_of" in trial.user_attrs else None, why="surplus")
    return True


def record_of(trial: optuna.trial.FrozenTrial, sweep: str, spec: SweepSpec, status: str | None = None
              ) -> dict[str, Any]:
    """The plain record of a told trial (the panel's and `Sweep.trials`' row); a pruned trial's value is the
    last eval_loss it reported."""
    value = trial.value if trial.state.name in ("COMPLETE", "PRUNED") else None
    return {"number": trial.number, "name": f"{sweep}/{trial.number}",
            "params": {d.name: d.decode(trial.params[d.name]) for d in spec.dimensions if d.name in trial.params},
            "value": value, "status": status or STATUS.get(trial.state.name, trial.state.name.lower()),
            "error": trial.user_attrs.get("error"), "steps": trial.user_attrs.get("steps"),
            "seconds": trial.user_attrs.get("seconds")}


def past_records(study: optuna.Study, sweep: str, spec: SweepSpec) -> list[dict[str, Any]]:
    """The records of the trials already told (by this process or another), in order."""
    return [record_of(t, sweep, spec) for t in study.get_trials(deepcopy=False)
            if counts(t) and t.state.name != "RUNNING"]


class PruneOnEval:
    """A trial run's observer: reports each eval_loss to Optuna at its step and stops the run when the pruner
    says so (the sweep then tells the trial PRUNED)."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self.pruned = False
        self._steps: set[int] = set()

    def on_eval(self, run: Any, metrics: dict[str, Any]) -> None:
        loss, step = metrics.get("eval_loss"), metrics.get("step")
        if not isinstance(loss, (int, float)) or not math.isfinite(loss) or step is None or step in self._steps:
            return  # the final evaluation repeats the last step's when eval_steps divides the steps
        self._steps.add(int(step))
        self.trial.report(float(loss), int(step))
        if run.status == "running" and step < run.total_steps and self.trial.should_prune():
            self.pruned = True
            run.stop()  # after this step; the run keeps what it learned, as a stopped run
