"""The objectives registry: what a run learns from is one `ObjectiveSpec`, registered by name.

An objective declares everything the rest of nbtune asks about it, so that nothing outside its own module
names it: its keys (`Param`s with defaults and help), the data formats it takes and how it checks their rows,
how it tokenises, previews and trains (its Trainer), what `train_on_prompt` means for its loss, what it logs
(the Trainer's names mapped to the run's), the curves the panel draws and the columns `nbtune.compare` shows,
and what it refuses: keys of other objectives, methods it cannot train with, settings that cannot work.
Registration is validated as `register_method`'s is, and refuses bad or duplicate names saying how to fix them.

    >>> from nbtune.objectives import get_objective
    >>> get_objective("dpo").param("beta").default
    0.1
    >>> get_objective("orpo").log_values({"logps/chosen": -1.0, "logps/rejected": -3.0})["logp_margin"]
    2.0
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

from nbtune.config.params import Param, run_setting_names
from nbtune.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from pathlib import Path

    from nbtune.config import RunConfig
    from nbtune.data.preview import BatchPreview
    from nbtune.engine.compute.memory import PeakSampler
    from nbtune.engine.records.run import Run
    from nbtune.engine.training.guards import NonFiniteGuard
    from nbtune.methods.registry import MethodSpec

Options = dict[str, Any]
# (train records, eval records or None, format, tokenizer, config) -> (train set, eval set or None): datasets
# with a `length` column for batching and the memory check.
Tokenize = Callable[[Any, Any, str, Any, "RunConfig"], tuple[Any, Any]]


class MakeTrainer(Protocol):
    def __call__(self, run: Run, train_set: Any, eval_set: Any, memory: PeakSampler, *, guard: NonFiniteGuard,
                 scratch: Path, shared_stop: Any = None) -> Any: ...


# (config, prepared tokenizer, n, train records, format) -> the first `n` examples as its Trainer builds them.
MakePreview = Callable[["RunConfig", Any, int, Any, str], "BatchPreview"]
# (config, format, dataset, field) -> None, or a DataError naming the row (the config: an objective whose check
# calls the run's own functions on a few rows, such as reward functions, has them there)
CheckData = Callable[["RunConfig", str, Any, str], None]
Validate = Callable[[Options, "RunConfig"], None]  # cross-checks of its checked keys against the run settings
SHOWN = ("line", "title", "")


@dataclass(frozen=True)
class Curve:
    """A number the objective reports, by step in `run.history` (and from each evaluation, in
    `run.eval_history` through `log_values(..., prefix="eval_")`), under the run's own name `key`.

    `shown`: "line" the panel draws it by step (train raw and smoothed, eval points); "title" its latest value
    titles that chart (a share of examples, 0..1); "" it is recorded only. `meaning` is one line for the
    chart's tooltip and the README."""

    key: str
    label: str
    meaning: str
    shown: str = ""


@dataclass(frozen=True)
class MethodRefusal:
    """Methods an objective cannot train with, declared: `reason(method, options)` says why this one cannot
    (None: it can), after `because`; `fix` says what to do instead."""

    reason: Callable[[MethodSpec, Options], str | None]
    because: str
    fix: str


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class ObjectiveSpec:
    """A training objective: its name and keys, the hooks the engine calls, and what it declares.

    Hooks (the engine calls them; see `objectives/sft.py` for the simplest set):
    - `tokenize(train, eval, fmt, tokenizer, config)`: the training sets, with a `length` column.
    - `trainer(run, train_set, eval_set, memory, guard=, scratch=, shared_stop=)`: a ready Trainer for
      `run.model`, carrying the engine's callbacks (engine/training/trainer.py `run_callbacks`).
    - `preview(config, tokenizer, n, train, fmt)`: the first `n` examples as that Trainer builds them (a
      `nbtune.data.preview.BatchPreview`), and `preview_header(batch)`: what the preview shows and how it was made.
    - `check_data(config, fmt, dataset, field)`: refuse data it cannot learn from, one line naming the row or
      the columns, before any weights load.

    Declarations (asked, never inferred from the name):
    - `params`: its keys, top-level in a config beside the run settings (`beta: 0.1` next to `steps: 40`); a
      key several objectives share is declared by each. `validate(options, config)` cross-checks them.
    - `formats`: the data formats it trains on (nbtune/data/formats.py names them).
    - `scores(train_on_prompt, fmt)`: what its loss scores, in words (the preview's "What is scored").
    - `train_on_prompt`: what `train_on_prompt: true` does for its loss; "" where it does not apply.
    - `refuses`: keys it does not take (another objective's, or a run setting it cannot use), each with why.
    - `method_refusals`: methods it cannot train with, each with why and the fix.
    - `log_keys`: the Trainer's logged names -> the run's (history records; `run.metrics` from evaluations); one
      `*` in both stands for a part that varies (`"rewards/*/mean": "reward_*"`: one key per reward function);
      `margins`: run keys computed as one logged key minus another.
    - `curves`: every number it reports, with label and meaning, and which the panel draws; `columns`: those
      `nbtune.compare` shows for it.
    - `kind`: its family in a few words ("supervised", "preference-tuning"), for messages.
    """

    name: str
    summary: str
    kind: str
    tokenize: Tokenize
    trainer: MakeTrainer
    preview: MakePreview
    preview_header: Callable[[BatchPreview], str]
    scores: Callable[[bool, str], str]
    check_data: CheckData
    formats: tuple[str, ...]
    params: tuple[Param, ...] = ()
    validate: Validate | None = None
    train_on_prompt: str = ""
    refuses: Mapping[str, str] = field(default_factory=dict)
    method_refusals: tuple[MethodRefusal, ...] = ()
    log_keys: Mapping[str, str] = field(default_factory=dict)
    margins: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    curves: tuple[Curve, ...] = ()
    columns: tuple[str, ...] = ()
    legend: str = "[[...]] carries loss (the model learns to predict it)."  # the preview's, in text
    trainer_class: Callable[[], type] | None = None  # the class `trainer` builds, where tests or tools need it

    def __post_init__(self) -> None:
        # A spec is shared by every run: its declared mappings must not change under them.
        for name in ("refuses", "log_keys", "margins"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))

    # ------------------------------------------------------------ keys
    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def option_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def default_options(self) -> Options:
        return {p.name: p.check(p.default) for p in self.params}

    def check_options(self, options: Mapping[str, Any], config: RunConfig) -> Options:
        """Defaults filled in, each value checked by its `Param`, then the objective's own cross-checks."""
        checked = {p.name: p.check(options.get(p.name, p.default)) for p in self.params}
        if self.validate is not None:
            self.validate(checked, config)
        return checked

    def check_method(self, method: MethodSpec, options: Options) -> None:
        """Raise `ConfigError` when the declared refusals rule out `method` with its checked `options`."""
        for refusal in self.method_refusals:
            why = refusal.reason(method, options)
            if why:
                raise ConfigError(f"method {method.name!r} with these options cannot train with `objective: "
                                  f"{self.name}`: {refusal.because}, and {why}. {refusal.fix}", field="objective")

    # ------------------------------------------------------------ what it reports
    def log_values(self, logs: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        """`logs` (the Trainer's names; `prefix` "eval_" for an evaluation's) under the run's names; {} for an
        objective that logs nothing of its own."""
        values: dict[str, Any] = {}
        for theirs, ours in self.log_keys.items():
            if "*" not in theirs:
                if prefix + theirs in logs:
                    values[ours] = logs[prefix + theirs]
                continue
            for key, value in logs.items():
                part = _wildcard(prefix + theirs, key)
                if part is not None:
                    values[ours.replace("*", part)] = value
        for key, (plus, minus) in self.margins.items():
            if plus in values and minus in values:
                values[key] = values[plus] - values[minus]
        return values

    def curve(self, key: str) -> Curve:
        for c in self.curves:
            if c.key == key:
                return c
        raise KeyError(key)

    def curves_in(self, keys: Iterable[str], shown: str) -> list[Curve]:
        """The curves shown as `shown` ("line", "title") that `keys` (a run's record keys) hold: a curve
        declared with a `*` once for each key it matches, its label saying which."""
        found = []
        for c in self.curves:
            if c.shown != shown:
                continue
            if "*" not in c.key:
                found.append(c)
                continue
            for key in dict.fromkeys(keys):
                part = _wildcard(c.key, key)
                if part is not None:
                    found.append(Curve(key, c.label.replace("*", part), c.meaning, c.shown))
        return found

    def reported(self) -> set[str]:
        """The run keys it can report: mapped log keys and margins."""
        return {*self.log_keys.values(), *self.margins}

    # ------------------------------------------------------------ for people
    def describe(self) -> str:
        lines = [f"{self.name}: {self.summary}"]
        lines += [f"    {p.describe()}" for p in self.params]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.describe()

    def _repr_markdown_(self) -> str:
        rows = [f"**{self.name}**: {self.summary}", "", "| key | default | what it does |", "|---|---|---|"]
        rows += [f"| `{p.name}` | `{p.default!r}` | {p.help} |" for p in self.params]
        return "\n".join(rows if self.params else [*rows[:1], "", "No keys of its own."])


def _wildcard(pattern: str, key: str) -> str | None:
    """What the one `*` of `pattern` stands for in `key`, or None when `key` does not match it."""
    head, _, tail = pattern.partition("*")
    if len(key) > len(head) + len(tail) and key.startswith(head) and key.endswith(tail):
        return key[len(head):len(key) - len(tail)]
    return None


_REGISTRY: dict[str, ObjectiveSpec] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_HOOKS = ("tokenize", "trainer", "preview", "preview_header", "scores", "check_data")


def register_objective(spec: ObjectiveSpec, *, replace: bool = False) -> ObjectiveSpec:
    """Add `spec` to the registry after checking it is well formed; returns it."""
    where = f"objective {spec.name!r}"
    if not isinstance(spec.name, str) or not _NAME.match(spec.name):
        raise ConfigError(f"objective name {spec.name!r} must be lowercase letters, digits and '_', starting with "
                          "a letter.")
    if spec.name in _REGISTRY and not replace:
        raise ConfigError(f"{where} is already registered; pass replace=True to override it.")
    for hook in _HOOKS:
        if not callable(getattr(spec, hook)):
            raise ConfigError(f"{where}: `{hook}` must be a callable (see ObjectiveSpec's docstring).")
    names = [p.name for p in spec.params]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: key names repeat: {names}.")
    clashes = sorted(set(names) & set(run_setting_names()))
    if clashes:
        raise ConfigError(f"{where}: key(s) {', '.join(clashes)} clash with run settings; rename them.")
    for p in spec.params:
        p.check(p.default)  # a default that fails its own check is a registration bug
    if not spec.formats:
        raise ConfigError(f"{where}: `formats` names no data format; declare those it trains on.")
    _check_reports(spec, where)
    _REGISTRY[spec.name] = spec
    return spec


def _check_reports(spec: ObjectiveSpec, where: str) -> None:
    reported = spec.reported()
    for theirs, ours in spec.log_keys.items():
        if theirs.count("*") > 1 or theirs.count("*") != ours.count("*"):
            raise ConfigError(f"{where}: log key `{theirs}` -> `{ours}`: a varying part is one `*` on both sides.")
    for key, (plus, minus) in spec.margins.items():
        if plus not in spec.log_keys.values() or minus not in spec.log_keys.values():
            raise ConfigError(f"{where}: margin `{key}` subtracts `{minus}` from `{plus}`; both must be run keys "
                              "of its `log_keys`.")
    for c in spec.curves:
        if c.shown not in SHOWN:
            raise ConfigError(f"{where}: curve `{c.key}` has shown={c.shown!r}; use 'line', 'title' or ''.")
    unreported = [k for k in (*(c.key for c in spec.curves), *spec.columns) if k not in reported]
    if unreported:
        raise ConfigError(f"{where}: curve or column `{unreported[0]}` is no key it reports (its `log_keys` "
                          "values and `margins`); map the Trainer's name to it.")
    undescribed = [k for k in spec.columns if k not in {c.key for c in spec.curves}]
    if undescribed:
        raise ConfigError(f"{where}: column `{undescribed[0]}` has no `Curve` saying what it means; declare one.")


def get_objective(name: str) -> ObjectiveSpec:
    """The registered objective called `name`, or a `ConfigError` naming the nearest and the known ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        by_lower = {key.lower(): spec for key, spec in _REGISTRY.items()}
        if isinstance(name, str) and name.lower() in by_lower:  # `DPO`, `SimPO` as papers write them
            return by_lower[name.lower()]
        hint = did_you_mean(str(name), _REGISTRY)
        raise ConfigError(f"`objective` is {name!r}, which is not a known objective.{hint} Known objectives: "
                          f"{', '.join(sorted(_REGISTRY))}.", field="objective") from None


def all_objectives() -> list[ObjectiveSpec]:
    """Every registered objective, by name (messages and tables list them in this order, whatever the order
    their modules were imported in)."""
    return sorted(_REGISTRY.values(), key=lambda spec: spec.name)


def report_columns(objectives: Iterable[str]) -> list[str]:
    """The table columns of these objectives (each declared by its spec), once each, in `all_objectives`
    order; names no longer registered (a saved run's) add none."""
    wanted = set(objectives)
    columns: list[str] = []
    for spec in all_objectives():
        if spec.name in wanted:
            columns += [c for c in spec.columns if c not in columns]
    return columns


__all__ = ["Curve", "MethodRefusal", "ObjectiveSpec", "all_objectives", "get_objective", "register_objective",
           "report_columns"]
