"""A sweep's configs, apart from its `sweep:` block (config/sweep_space.py): `trial_config`, a point of the
search space as a run's config, and its complement, the *fixed settings*: the whole config less the swept
keys, the sweep's name and folders, and the settings that change no trial's result. A stored study is
continued only by a sweep of the same fixed settings, data and block (`study_fingerprint`); `changes` names
what differs, in the words of the cell (`steps: 6 → 4`). No torch, no Optuna.

    >>> changes(stored, study_fingerprint(config, spec, data))   # doctest: +SKIP
    ['steps: 6 → 4']
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nbtune.config import RunConfig
    from nbtune.config.sweep_space import SweepSpec

# Not part of what a study must match: they name the sweep and its folders (the trials get their own), or
# change how a trial is kept, watched or checked, never what it learns or scores.
NOT_FIXED = ("name", "output_dir", "sweep", "save", "report_to", "memory_check", "checkpoint_steps",
             "keep_checkpoints", "sample_every", "sample_prompts", "gradient_checkpointing")
# Filled in from the machine when unset (engine/compute/device.py): the processes sharing a study may run on
# different GPUs, and still run the same sweep. Set in the config, they are fixed settings like any other.
MACHINE_DEFAULTS = ("precision", "dtype")
SHOWN = 40  # characters of a setting's value in a `changes` line
NAMED = 3  # changes named in one line; the rest are counted


def trial_config(config: RunConfig, spec: SweepSpec, params: dict[str, Any], *, name: str,
                 output_dir: str | None, pruning: bool = True) -> RunConfig:
    """`config` with `params`, `name` and `output_dir` set and no `sweep`. A trial of another method keeps the
    options that method also has and that were changed from their default; with a pruner, a trial that would
    evaluate only at its end evaluates every steps/5 steps (`SweepSpec.eval_steps_for`)."""
    from nbtune.config import RunConfig, overlay
    from nbtune.methods import get_method

    raw = config.to_dict()
    raw["derived"] = {k: v for k, v in config.derived.items() if k not in params}  # re-derived where not set
    method = params.get("method", config.method)
    if method != config.method:
        old, new = get_method(config.method), get_method(method)
        defaults = old.default_options()
        for key in old.option_names():
            if key not in new.option_names() or raw.get(key) == defaults[key]:
                raw.pop(key, None)
    # overlay: a swept `steps` replaces the config's `epochs` (and the other way round), as a cell's would
    raw = overlay(raw, params, {"name": name, "output_dir": output_dir, "sweep": None})
    if pruning:
        raw["eval_steps"] = spec.eval_steps_for(raw.get("steps"), raw["eval_steps"])
    return RunConfig.parse(raw)


def fixed_settings(config: RunConfig, spec: SweepSpec, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every setting and method option every trial shares, as JSON. `data`, the rows as read
    (engine/records/provenance.py data_record), stands for `data` and `eval_data`: the same rows from another path (a
    second machine's copy) are the same data, and an edited file or DataFrame is not."""
    raw = config.to_json_dict()
    derived = raw.pop("derived")  # which values were filled in; the values themselves are in `raw`
    settings = {k: v for k, v in raw.items() if k not in NOT_FIXED and k not in spec.names
                and not (k in MACHINE_DEFAULTS and k in derived)}
    if data is not None:
        settings.pop("eval_data", None)
        settings["data"] = data
    return json.loads(json.dumps(settings, sort_keys=True, default=str))  # as a study's storage gives it back


def study_fingerprint(config: RunConfig, spec: SweepSpec, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a stored study must match to be continued: the block's (`SweepSpec.fingerprint`: space, the metric
    it optimises, sampler, pruner; not `trials`, which is how a sweep grows) and the fixed settings."""
    return json.loads(json.dumps({**spec.fingerprint(), "settings": fixed_settings(config, spec, data)}))


def as_stored_now(stored: dict[str, Any] | None) -> dict[str, Any] | None:
    """A stored study's fingerprint with today's key names: studies of earlier versions named the metric
    `objective` (now `optimize`, as the block does), and are continued all the same."""
    if stored is None or "objective" not in stored or "optimize" in stored:
        return stored
    return {("optimize" if key == "objective" else key): value for key, value in stored.items()}


def changes(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """What differs between a stored study's fingerprint and this sweep's, as 'steps: 6 → 4' and the like. A
    key the stored one lacks (a study an older nbtune made) is not compared."""
    stored = as_stored_now(stored) or {}
    said = [f"sweep.{key}: {_shown(stored[key])} → {_shown(wanted.get(key))}"
            for key in ("optimize", "direction", "sampler", "pruner")
            if key in stored and stored[key] != wanted.get(key)]
    old_space, new_space = stored.get("space", {}), wanted.get("space", {})
    for name in dict.fromkeys([*old_space, *new_space]):
        old, new = old_space.get(name), new_space.get(name)
        if old != new:
            said.append(f"sweep.{name}: {_dimension(old)} → {_dimension(new)}")
    if "settings" in stored:
        old_settings, new_settings = stored["settings"], wanted.get("settings", {})
        for key in dict.fromkeys([*old_settings, *new_settings]):
            old, new = old_settings.get(key), new_settings.get(key)
            if old != new:
                rows = key == "data" and isinstance(old, dict) and isinstance(new, dict)
                said.append(_data_change(old, new) if rows else f"{key}: {_shown(old)} → {_shown(new)}")
    return said


def said_briefly(said: list[str]) -> str:
    """The first NAMED changes, and how many more: one line however much changed."""
    more = len(said) - NAMED
    return "; ".join(said[:NAMED]) + (f"; and {more} more" if more > 0 else "")


def _dimension(value: Any) -> str:
    if value is None:
        return "(not swept)"
    kind, values = value
    return _shown(values) if kind == "choice" else f"{{{kind}: {_shown(values)}}}"


def _data_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    def rows(record: dict[str, Any], part: str) -> int | None:
        return (record.get(part) or {}).get("rows")

    counts = [f"{part} {rows(old, part)} → {rows(new, part)} rows" for part in ("train", "eval")
              if rows(old, part) != rows(new, part)]
    return "data: other rows" + (f" ({', '.join(counts)})" if counts else "")


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= SHOWN else text[: SHOWN - 1] + "…"
