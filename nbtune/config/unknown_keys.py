"""The one-line error for a key that is neither a run setting, nor an option of the run's method, nor a key of
its objective: nbtune's name for another library's key, the method that has this option, or else the nearest
spelling (which comes last: `max_steps` is spelt most like `eval_steps`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from nbtune.config.foreign_names import foreign_name
from nbtune.config.params import Param
from nbtune.errors import ConfigError, did_you_mean


def unknown_key(key: str, value: Any, method: Any, settings: Mapping[str, Param]) -> ConfigError:
    """The error for `key` (given as `value`), which is no key of `settings` (run settings and the objective's
    keys) nor an option of `method`, with its fix."""
    from nbtune.methods.registry import all_methods

    own = method.option_names()
    listing = f"{method.name}'s options: {', '.join(own) or 'none'}."
    foreign = foreign_name(key)
    if foreign is not None and foreign.key is None:
        return ConfigError(f"unknown key `{key}` ({foreign.whose}): {foreign.advice}.", field=key)
    if foreign is not None and foreign.key is not None:
        target, new = foreign.key, foreign.value(value)
        owners = [m.name for m in all_methods() if {target, *foreign.family} <= set(m.option_names())]
        if target in settings or method.name in owners:
            if new is None:
                return ConfigError(f"unknown key `{key}` ({foreign.whose}): `{key}: {_shown(value)}` is nbtune's "
                                   "default; drop it.", field=key)
            if foreign.values:
                return ConfigError(f"unknown key `{key}`: nbtune writes it `{target}: {_shown(new)}` (`{key}` is "
                                   f"{foreign.whose}).", field=key)
            return ConfigError(f"unknown key `{key}`: nbtune calls it `{target}` (`{key}` is {foreign.whose}); "
                               f"write `{target}: {_shown(new)}`.", field=key)
        if "peft_args" not in own:
            return ConfigError(f"unknown key `{key}`: nbtune calls it `{target}` (`{key}` is {foreign.whose}), an "
                               f"option of {', '.join(owners)}, not of {method.name}; set `method: {_pick(owners)}` "
                               f"to use it. {listing}", field=key)
    # An option of another method is a method mix-up, not a typo: a did-you-mean would offer `lr` for `r`.
    owners = [m.name for m in all_methods() if key in m.option_names()]
    hint = "" if owners or foreign is not None else did_you_mean(key, [*settings, *own])
    if "peft_args" in own and not hint:  # method `peft` passes a tuner's own arguments through as they are
        return ConfigError(f"unknown key `{key}` for method {method.name!r}: the tuner's own arguments go in "
                           f"`peft_args` as peft names them, e.g. `peft_args: {{{key}: {_shown(value)}}}`.", field=key)
    if owners:
        return ConfigError(f"unknown key `{key}` for method {method.name!r}: `{key}` is an option of "
                           f"{', '.join(owners)}, not of {method.name}; set `method: {_pick(owners)}` to use it. "
                           f"{listing}", field=key)
    return ConfigError(f"unknown key `{key}` for method {method.name!r}.{hint} Method options: "
                       f"{', '.join(own) or 'none'}; run settings: see nbtune.RunConfig.", field=key)


def _pick(owners: list[str]) -> str:
    return "lora" if "lora" in owners else owners[0]


def _shown(value: Any) -> str:
    """`value` as YAML writes it, or '...' where that would be long or more than one line."""
    try:
        text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
    except yaml.YAMLError:
        return "..."
    return text if len(text) <= 60 and "\n" not in text else "..."
