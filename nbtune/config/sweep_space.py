"""A config's `sweep:` block read and checked: the search space, the metric to optimise, how trials are chosen
and judged (a point of the space as a run's config: engine/experiments/sweep_config.py). No torch, no Optuna:
parsing a config checks its block once (`check_sweep_spec`) and keeps it as `config.sweep_space`.

    >>> spec = check_sweep_spec({"r": [4, 8], "dropout": [0.0, 0.1]}, config)  # doctest: +SKIP
    >>> spec.sampler, spec.trials, spec.optimize  # a grid of lists, all of it, eval_loss  # doctest: +SKIP
    ('grid', 4, 'eval_loss')

A dimension is a run setting or an option of the method (of every method, when `method` itself is swept):
a list of values (categorical; a grid's axis), or one distribution: `{uniform: [low, high]}`,
`{log_uniform: [low, high]}`, `{int: [low, high]}`, `{int_log: [low, high]}` (the last two, and a
distribution on an integer setting such as `r`, sample whole numbers). The other keys of the block:
`trials` (default: the grid's size when every dimension is a list, else 10), `optimize` (a metric the
trials report, `{name: min|max}`; default `eval_loss: min`, or without evaluation data `final_loss: min`,
the mean training loss of a trial's last 10% of steps; not `objective`, which is what a run learns from),
`sampler` (grid | random | tpe; default grid when every dimension is a list, else tpe), `pruner` (none |
median | hyperband), `storage` (an Optuna storage URL; default the SQLite file `<sweep folder>/study.db`) and
`keep_models` (default 2).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nbtune.config.params import Param, run_settings
from nbtune.data.loading import is_demo
from nbtune.errors import ConfigError, NbtuneError, did_you_mean

if TYPE_CHECKING:
    from nbtune.config import RunConfig

BLOCK_KEYS = ("trials", "optimize", "sampler", "pruner", "storage", "keep_models")
DISTRIBUTIONS = ("uniform", "log_uniform", "int", "int_log")
SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "hyperband")
DIRECTIONS = {"min": "minimize", "minimize": "minimize", "max": "maximize", "maximize": "maximize"}
# Lower wins; every other metric scores answers: higher wins (training losses: callbacks.loss_summary).
LOWER_IS_BETTER = ("eval_loss", "final_loss", "train_loss", "last_loss", "perplexity")
TRAINING_LOSSES = ("final_loss", "train_loss", "last_loss")
DEFAULT_TRIALS = 10
# Settings a trial cannot take from the search: they name the sweep, its folders, or another kind of job.
_NOT_WITH_CV = "a sweep and a cross-validation do not combine"
NOT_SWEPT = {"name": "the trials are named <sweep>/<number>", "output_dir": "the trials are saved under the sweep's "
             "folder", "sweep": "a sweep does not nest", "cv": _NOT_WITH_CV, "cv_fold": _NOT_WITH_CV}
EXAMPLE = "e.g. `lr: {log_uniform: [1e-4, 3e-3]}` or `r: [4, 8, 16]`"
SCALARS = (str, int, float, bool, type(None))  # what Optuna's storages hold as a categorical value


@dataclass(frozen=True)
class Dimension:
    """One searched setting: `choices` (a list) or a distribution `kind` over [low, high]."""

    name: str
    kind: str  # "choice" or one of DISTRIBUTIONS
    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    integer: bool = False  # sampled as whole numbers: `int`/`int_log`, or any distribution on an int setting

    @property
    def log(self) -> bool:
        return self.kind in ("log_uniform", "int_log")

    def encoded(self) -> list[Any]:
        """The choices as Optuna stores them: plain values as they are, lists and mappings as JSON text."""
        return [encode(value) for value in self.choices]

    def decode(self, stored: Any) -> Any:
        """A value as the study holds it -> the value a trial's config gets."""
        if self.kind != "choice":
            return stored
        return dict(zip(self.encoded(), self.choices, strict=True)).get(stored, stored)

    def checked_values(self) -> tuple[Any, ...]:
        """What is parsed into a config before anything trains: every choice, or both bounds."""
        if self.kind == "choice":
            return self.choices
        return (int(self.low), int(self.high)) if self.integer else (self.low, self.high)


@dataclass(frozen=True)
class SweepSpec:
    """A checked `sweep:` block (see the module docstring)."""

    dimensions: tuple[Dimension, ...]
    trials: int
    optimize: str  # the metric the trials are ranked on (`optimize: {eval_loss: min}`)
    direction: str  # "minimize" or "maximize"
    sampler: str
    pruner: str
    storage: str | None
    keep_models: int
    grid_size: int | None  # when every dimension is a list

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dimensions]

    def fingerprint(self) -> dict[str, Any]:
        """What a stored study must match to be continued, of the block: the space, the metric, the sampler
        and the pruner (not `trials`: asking for more of the same sweep is how it grows). The rest of the config
        is engine/experiments/sweep_config.py's `study_fingerprint`."""
        space = {d.name: [d.kind, d.encoded() if d.kind == "choice" else [d.low, d.high]] for d in self.dimensions}
        return {"space": space, "optimize": self.optimize, "direction": self.direction, "sampler": self.sampler,
                "pruner": self.pruner}

    def eval_steps_for(self, steps: int | None, eval_steps: int) -> int:
        """A trial's `eval_steps`: a pruner judges trials at evaluation points, so a trial that would only
        evaluate at its end evaluates about five times (every steps/5 steps, at least every step)."""
        if self.pruner == "none" or eval_steps or not steps:
            return eval_steps
        return max(1, steps // 5)


def encode(value: Any) -> Any:
    """A categorical value as a study can store it (lists of module names become JSON text)."""
    return value if isinstance(value, SCALARS) else json.dumps(value, sort_keys=True)


# ---------------------------------------------------------------------------- the check
def check_sweep_spec(spec: Any, config: RunConfig) -> SweepSpec:
    """The `sweep:` block of `config` checked, each mistake one `ConfigError` naming `sweep.<key>` and the fix.
    `config` is the sweep's own config (its `sweep` is not read), as it is being parsed: parsing a config
    checks its block once and keeps the result as `config.sweep_space`."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"`sweep` maps settings to the values to try ({EXAMPLE}), plus `trials` and "
                          f"`optimize`; got {type(spec).__name__} {spec!r}.", field="sweep")
    _check_sweep_itself(config)
    _refuse_old_spelling(spec)
    spaces = {k: v for k, v in spec.items() if k not in BLOCK_KEYS}
    if not spaces:
        raise ConfigError(f"`sweep` declares no setting to search; add one, {EXAMPLE}.", field="sweep")
    methods = _methods(spaces.get("method"), config)
    dimensions = tuple(_dimension(str(name), value, _params_of(str(name), methods, config))
                       for name, value in spaces.items())
    optimize, direction = _optimize(spec.get("optimize"), config)
    grid = math.prod(len(d.choices) for d in dimensions) if all(d.kind == "choice" for d in dimensions) else None
    sampler = _choice(spec, "sampler", SAMPLERS, "grid" if grid is not None else "tpe")
    trials = _trials(spec.get("trials"), grid, sampler, explicit="sampler" in spec)
    pruner = _choice(spec, "pruner", PRUNERS, "none")
    _check_pruner(pruner, optimize, config, "steps" in spaces)
    return SweepSpec(dimensions, trials, optimize, direction, sampler, pruner, _storage(spec.get("storage")),
                     _keep_models(spec.get("keep_models", 2)), grid)


def _check_sweep_itself(config: RunConfig) -> None:
    if config.cv:
        raise ConfigError(f"`sweep` and `cv: {config.cv}` do not combine: a sweep compares its trials on one "
                          "evaluation set. Drop `cv`; cross-validate the best config afterwards (sweep.to_cell()).",
                          field="sweep")
    if "/" in str(config.name):
        raise ConfigError(f"a sweep's `name` names the folder of its trials (<name>/<number>); {config.name!r} has "
                          "a '/': give a plain name.", field="name")


def _methods(value: Any, config: RunConfig) -> list[Any]:
    """The methods the trials may use: the swept ones (each checked by name), else the config's."""
    from nbtune.methods import get_method

    names = value if isinstance(value, list) and value else [config.method]
    methods = []
    for name in names:
        try:
            methods.append(get_method(str(name)))
        except NbtuneError as exc:
            raise ConfigError(f"`sweep.method`: {exc}", field="sweep") from None
    return methods


def _params_of(name: str, methods: Sequence[Any], config: RunConfig) -> Param:
    """The `Param` that checks `name`'s values: a run setting's, the run's objective's key (`beta`), or the
    option's of every method tried."""
    from nbtune.objectives.registry import get_objective

    objective = get_objective(config.objective)
    settings = {**run_settings(), **{p.name: p for p in objective.params}}
    if name in NOT_SWEPT:
        raise ConfigError(f"`sweep.{name}`: `{name}` cannot be searched ({NOT_SWEPT[name]}); set it outside "
                          "`sweep`.", field="sweep")
    if name in settings:
        return settings[name]
    owners = [m for m in methods if name in m.option_names()]
    if owners and len(owners) < len(methods):
        others = ", ".join(m.name for m in methods if m not in owners)
        raise ConfigError(f"`sweep.{name}` is an option of {', '.join(m.name for m in owners)} but not of "
                          f"{others}, which `sweep.method` may pick; sweep methods that share it, or run one sweep "
                          "per method.", field="sweep")
    if owners:
        return owners[0].param(name)
    known = [*settings, *(n for m in methods for n in m.option_names()), *BLOCK_KEYS]
    which = ", ".join(m.name for m in methods)
    raise ConfigError(f"`sweep.{name}` is neither a run setting nor an option of {which}.{did_you_mean(name, known)} "
                      f"Search a run setting (see nbtune.RunConfig) or one of: "
                      f"{', '.join(n for m in methods for n in m.option_names()) or 'no options'}.", field="sweep")


def _dimension(name: str, value: Any, param: Param) -> Dimension:
    if isinstance(value, (list, tuple)):
        return _choices(name, list(value), param)
    if not isinstance(value, Mapping):
        raise ConfigError(f"`sweep.{name}: {value!r}` is one value; give a list of values to try or a distribution "
                          f"({', '.join(DISTRIBUTIONS)}), or set `{name}: {value!r}` outside `sweep`.", field="sweep")
    if len(value) != 1:
        raise ConfigError(f"`sweep.{name}` is one distribution, e.g. `{{log_uniform: [1e-4, 3e-3]}}`; got "
                          f"{dict(value)!r}.", field="sweep")
    [(kind, bounds)] = value.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"`sweep.{name}` has distribution `{kind}`, which nbtune does not know."
                          f"{did_you_mean(str(kind), DISTRIBUTIONS)} Distributions: {', '.join(DISTRIBUTIONS)}; "
                          "or give a list of values.", field="sweep")
    if param.kind not in ("int", "float"):
        raise ConfigError(f"`sweep.{name}`: `{kind}` draws numbers, and `{name}` is not a number setting; list the "
                          f"values to try instead, e.g. `{name}: [a, b]`.", field="sweep")
    low, high = _bounds(name, kind, bounds)
    integer = kind.startswith("int") or param.kind == "int"
    if integer and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"`sweep.{name}` draws whole numbers; its bounds [{low}, {high}] must be whole numbers.",
                          field="sweep")
    for bound in (low, high):
        _checked(name, param, int(bound) if integer else bound)
    return Dimension(name, kind, low=low, high=high, integer=integer)


def _bounds(name: str, kind: str, bounds: Any) -> tuple[float, float]:
    numbers = isinstance(bounds, (list, tuple)) and len(bounds) == 2 and all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) for b in bounds)
    if not numbers:
        raise ConfigError(f"`sweep.{name}: {{{kind}: ...}}` takes two numbers [low, high]; got {bounds!r}.",
                          field="sweep")
    low, high = bounds
    if low >= high:
        raise ConfigError(f"`sweep.{name}: {{{kind}: [{low}, {high}]}}`: low must be below high.", field="sweep")
    if kind in ("log_uniform", "int_log") and low <= 0:
        raise ConfigError(f"`sweep.{name}: {{{kind}: [{low}, {high}]}}`: a log scale starts above 0; give a "
                          "positive low bound, or use uniform.", field="sweep")
    return low, high


def _choices(name: str, values: list[Any], param: Param) -> Dimension:
    if not values:
        raise ConfigError(f"`sweep.{name}` lists no values; give at least one, e.g. `{name}: [a, b]`.",
                          field="sweep")
    seen: list[str] = []
    for value in values:
        _checked(name, param, value)
        try:
            key = repr(encode(value))
        except (TypeError, ValueError):
            raise ConfigError(f"`sweep.{name}` lists {value!r}, which a study cannot store; list plain values "
                              "(numbers, text, true/false, or lists of them).", field="sweep") from None
        if key in seen:
            raise ConfigError(f"`sweep.{name}` lists {value!r} twice; list each value once.", field="sweep")
        seen.append(key)
    return Dimension(name, "choice", choices=tuple(values))


def _checked(name: str, param: Param, value: Any) -> Any:
    try:
        return param.check(value)
    except ConfigError as exc:
        raise ConfigError(f"`sweep.{name}`: {exc}", field="sweep") from None


def _refuse_old_spelling(spec: Mapping[str, Any]) -> None:
    """`objective:` named the metric to optimise until it became `optimize:`; `objective` is what a run learns
    from (sft, dpo, ...). A list under it searches that setting like any other; a metric (a name, or
    `{name: min|max}`) is the old spelling, answered by the new one."""
    value = spec.get("objective")
    if value is None or isinstance(value, (list, tuple)):
        return
    one = isinstance(value, Mapping) and len(value) == 1 and not set(value) & set(DISTRIBUTIONS)
    if not (isinstance(value, str) or one):
        return  # a distribution: `sweep.objective` is then refused as the setting it names
    shown = f"{{{next(iter(value))}: {next(iter(value.values()))}}}" if one else value
    raise ConfigError(f"`sweep.objective` is now `sweep.optimize` (objective: is what a run learns from, sft or dpo); "
                      f"write `optimize: {shown}`.", field="sweep")


# ---------------------------------------------------------------------------- the metric, sampler, pruner
def _optimize(value: Any, config: RunConfig) -> tuple[str, str]:
    if value is None:  # without held-out rows, the end of training: an average of steps, not one noisy batch
        name, direction = ("eval_loss" if has_eval_data(config) else "final_loss"), "minimize"
    elif isinstance(value, str):
        name = value.strip()
        direction = "minimize" if name in LOWER_IS_BETTER else "maximize"
    elif isinstance(value, Mapping) and len(value) == 1:
        [(name, word)] = value.items()
        direction = DIRECTIONS.get(str(word).lower(), "")
        if not direction:
            raise ConfigError(f"`sweep.optimize: {{{name}: {word}}}`: the direction is min or max.", field="sweep")
    else:
        raise ConfigError(f"`sweep.optimize` is one metric and its direction, e.g. `{{eval_loss: min}}` or "
                          f"`{{exact_match: max}}`; got {value!r}.", field="sweep")
    _check_reported(str(name), config)
    return str(name), direction


def has_eval_data(config: RunConfig) -> bool:
    """Whether the trials evaluate on held-out rows (as nbtune/data/splits.py decides)."""
    demo = is_demo(config.data)
    return config.eval_data is not None or config.eval_split > 0 or demo


def reported_metrics(config: RunConfig) -> list[str]:
    """The metrics every trial of `config` reports at its end: the training losses (TRAINING_LOSSES), and with
    evaluation data eval_loss and the metrics `metric` names (perplexity, and the scores of generated answers)."""
    from nbtune.engine.evaluation.metrics import resolve_metrics

    if not has_eval_data(config):
        return list(TRAINING_LOSSES)
    demo = is_demo(config.data)
    named = [m.name for m in resolve_metrics(config.metric, demo=demo)]
    return list(dict.fromkeys(["eval_loss", *named, *TRAINING_LOSSES]))


def _check_reported(name: str, config: RunConfig) -> None:
    from nbtune.engine.evaluation.metrics import METRICS

    reported = reported_metrics(config)
    if name in reported:
        return
    where = f"`sweep.optimize: {name}`"
    if not has_eval_data(config) and (name in ("eval_loss", "perplexity") or name in METRICS):
        raise ConfigError(f"{where}: the trials have no evaluation data to measure it on; set `eval_split` (e.g. "
                          "0.2) or `eval_data`, or rank on the training loss (`optimize: final_loss`, the mean of "
                          "the last 10% of steps).", field="sweep")
    if name in METRICS:
        same = " (or optimize eval_loss: the same ranking)" if name == "perplexity" else ""
        raise ConfigError(f"{where}: the trials report {name} only when `metric` names it; add it to `metric`"
                          f"{same}. They report: {', '.join(reported)}.", field="sweep")
    raise ConfigError(f"{where}: no trial reports {name!r}.{did_you_mean(name, [*reported, *METRICS])} They report: "
                      f"{', '.join(reported)}.", field="sweep")


def _choice(spec: Mapping[str, Any], key: str, allowed: Sequence[str], default: str) -> str:
    value = spec.get(key)
    if value is None:
        return default
    if value not in allowed:
        raise ConfigError(f"`sweep.{key}: {value}` is not one of {', '.join(allowed)}."
                          f"{did_you_mean(str(value), allowed)}", field="sweep")
    return str(value)


def _trials(value: Any, grid: int | None, sampler: str, *, explicit: bool) -> int:
    if sampler == "grid" and grid is None:
        raise ConfigError("`sweep.sampler: grid` takes lists only, and some setting has a distribution: list its "
                          "values, or use sampler: tpe or random.", field="sweep")
    if value is None:
        return grid if sampler == "grid" and grid is not None else DEFAULT_TRIALS
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"`sweep.trials` is a whole number of trials, e.g. 12; got {value!r}.", field="sweep")
    if value < 1:
        raise ConfigError(f"`sweep.trials: {value}` runs nothing; give 1 or more (e.g. trials: 12).", field="sweep")
    if sampler != "grid" or grid is None:
        return value
    if value > grid:
        raise ConfigError(f"`sweep.trials: {value}` is more than the grid's {grid} points; leave `trials` out (the "
                          "whole grid), or use sampler: random or tpe.", field="sweep")
    if value < grid and not explicit:
        raise ConfigError(f"`sweep.trials: {value}` is fewer than the grid's {grid} points (every combination of "
                          "the lists); leave `trials` out for the whole grid, or say `sampler: grid` to try "
                          f"{value} of its points at random.", field="sweep")
    return value


def _check_pruner(pruner: str, optimize: str, config: RunConfig, steps_swept: bool) -> None:
    if pruner == "none":
        return
    if not has_eval_data(config):
        raise ConfigError(f"`sweep.pruner: {pruner}` judges trials by their eval_loss at each evaluation point, and "
                          "the trials have no evaluation data; set `eval_split` (e.g. 0.2) or `eval_data`, or "
                          "`pruner: none`.", field="sweep")
    if optimize != "eval_loss":
        raise ConfigError(f"`sweep.pruner: {pruner}` judges trials by their eval_loss at each evaluation point, "
                          f"while {optimize} is measured only at a trial's end; use `optimize: {{eval_loss: min}}` "
                          "or `pruner: none`.", field="sweep")
    if not config.eval_steps and config.steps is None and not steps_swept:
        raise ConfigError(f"`sweep.pruner: {pruner}` judges trials at their evaluation points; set `eval_steps` "
                          "(or `steps`, and nbtune evaluates every steps/5 steps).", field="sweep")


def _storage(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or "://" not in value:
        raise ConfigError(f"`sweep.storage` is an Optuna storage URL, e.g. 'sqlite:///shared/study.db' or "
                          f"'postgresql://host/db'; got {value!r}.", field="sweep")
    return value


def _keep_models(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"`sweep.keep_models` is how many of the best trials keep their models in memory (0 or "
                          f"more); got {value!r}.", field="sweep")
    return value
