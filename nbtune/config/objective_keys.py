"""The objective's keys in a config: which top-level keys are the objective's (`beta: 0.1` beside `steps: 40`),
checked by its `Param`s, with one line for each that cannot work.

The objective declares everything checked here (nbtune/objectives/registry.py `ObjectiveSpec`): its keys,
why it refuses another objective's key, what `train_on_prompt` means for it, its cross-checks and the methods
it cannot train with. Nothing here names an objective.

    >>> from nbtune.config import RunConfig
    >>> RunConfig.parse({"objective": "dpo", "beta": 0.2}).objective_options["beta"]
    0.2
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from nbtune.errors import ConfigError

if TYPE_CHECKING:
    from nbtune.config import RunConfig
    from nbtune.methods.registry import MethodSpec
    from nbtune.objectives.registry import ObjectiveSpec


def take_objective_keys(values: dict[str, Any], raw: dict[str, Any], method: MethodSpec
                        ) -> tuple[ObjectiveSpec, dict[str, Any]]:
    """The run's objective (`values["objective"]` set to its registered name) and its keys, taken out of `raw`
    (flat, or nested under `objective_options:`); what stays in `raw` is the method's."""
    from nbtune.objectives.registry import get_objective

    objective = get_objective(values["objective"])
    values["objective"] = objective.name
    return objective, split_objective_keys(raw, raw.pop("objective_options", None) or {}, method, objective)


def split_objective_keys(raw: dict[str, Any], nested: Any, method: MethodSpec, objective: ObjectiveSpec
                         ) -> dict[str, Any]:
    """Take the objective's keys out of `raw` (the keys left after the run settings, in place) and return them
    with those of a nested `objective_options:` mapping; a key of another objective is refused in one line."""
    from nbtune.objectives.registry import all_objectives

    if not isinstance(nested, Mapping):
        raise ConfigError("`objective_options` must be a mapping of the objective's keys.", field="objective_options")
    own = objective.option_names()
    both = [k for k in own if k in method.option_names() and (k in raw or k in nested)]
    if both:
        raise ConfigError(f"`{both[0]}` is both an option of method {method.name!r} and a key of `objective: "
                          f"{objective.name}`, so a config cannot say which it sets; rename one of them where it is "
                          "registered.", field=both[0])
    others = {name for spec in all_objectives() for name in spec.option_names()} - set(method.option_names())
    for key in [*raw, *nested]:
        if key not in own and key in others:
            raise _not_this_objectives(key, objective)
    unknown = [k for k in nested if k not in own]
    if unknown:
        raise ConfigError(f"`objective_options` has `{unknown[0]}`, which is no key of `objective: {objective.name}` "
                          f"(its keys: {', '.join(own) or 'none'}).", field=unknown[0])
    taken = {k: raw.pop(k) for k in list(raw) if k in own}
    return {**nested, **taken}


def _not_this_objectives(key: str, objective: ObjectiveSpec) -> ConfigError:
    """A key of other objectives on this one: why it does not apply (as this objective declares it, if it
    does) and which objectives have it."""
    from nbtune.objectives.registry import all_objectives

    owners = [spec for spec in all_objectives() if key in spec.option_names()]
    first, rest = owners[0].name, [spec.name for spec in owners[1:]]
    alternatives = f"`objective: {first}`" + (f" (or {', '.join(rest)})" if rest else "")
    why = objective.refuses.get(key)
    if why:
        return ConfigError(f"`{key}` does not apply to `objective: {objective.name}` ({why}); remove it, or set "
                           f"{alternatives}, which has it.", field=key)
    kinds = {spec.kind for spec in owners}
    what = f"a {kinds.pop()} setting" if len(kinds) == 1 else f"a setting of {', '.join(s.name for s in owners)}"
    return ConfigError(f"`{key}` is {what} and this run's `objective` is {objective.name}; set {alternatives}, "
                       f"or remove `{key}`.", field=key)


def check_objective_keys(config: RunConfig, objective: ObjectiveSpec, given: Mapping[str, Any]) -> None:
    """`config.objective_options` from `given`: each key checked by its `Param`, the rest at their defaults
    (recorded as derived: a config re-parsed with another objective drops them), then the objective's own
    checks against the run settings."""
    _check_train_on_prompt(config, objective)
    object.__setattr__(config, "objective_options", objective.check_options(given, config))  # still being made
    for key, value in config.objective_options.items():
        if key not in given:
            config.derived[key] = value


def _check_train_on_prompt(config: RunConfig, objective: ObjectiveSpec) -> None:
    if not config.train_on_prompt or objective.train_on_prompt:
        return
    from nbtune.objectives.registry import all_objectives

    takers = [spec for spec in all_objectives() if spec.train_on_prompt]
    takers = [spec for spec in takers if spec.kind == objective.kind] or takers  # the nearest alternative first
    why = objective.refuses.get("train_on_prompt")
    where = "; ".join(f"`objective: {spec.name}` takes it, {spec.train_on_prompt}" for spec in takers)
    raise ConfigError(f"`train_on_prompt` does not apply to `objective: {objective.name}`" + (f": {why}" if why else "")
                      + f"; remove it ({where}).", field="train_on_prompt")


__all__ = ["check_objective_keys", "split_objective_keys", "take_objective_keys"]
