"""A `RunConfig` as YAML text: the one writer behind `RunConfig.to_text`, so the picker's `%%finetune` cell,
`run.to_yaml()`, exported scripts and launch files all say a config the same way.

The text is `RunConfig.parse`'s input: keys in the order `RunConfig` declares them, method options after the
run settings, in-memory data (a list of dicts, a DataFrame, a Dataset) as its rows, so the text alone is the
whole experiment and `RunConfig.parse(config.to_text())` gives back an equal config. Unset (None) values are
never written: leaving them out reads back the same. `omit` leaves out more:

- ``"derived"`` (the default): values nbtune filled in from other settings (`RunConfig.derived`: lr and
  quantization from the method, epochs, precision, ...) that still hold what nbtune gave them. Read back,
  they are derived again, so a changed method brings its own learning rate.
- ``"defaults"``: run settings and method options equal to their declared default. `method` stays: it says
  what the other keys mean.
- any key by name (a run setting, a key of the config's objective or an option of its method), e.g. ``"name"``.

    >>> from nbtune.config import RunConfig
    >>> cfg = RunConfig.parse({"name": "short", "method": "lora", "r": 16, "steps": 30})
    >>> print(cfg.to_text(omit=("defaults", "derived")), end="")
    name: short
    method: lora
    steps: 30
    r: 16
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from nbtune.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from nbtune.config import RunConfig

OMIT_WORDS = ("defaults", "derived")
ALWAYS_WRITTEN = ("method",)  # without it, the options in the text have no meaning to a reader
_PLAIN = (str, int, float, bool, list, tuple, dict)  # values that compare with `==` to one bool


def config_text(config: RunConfig, omit: str | Iterable[str] = ("derived",)) -> str:
    """`config` as YAML for `RunConfig.parse`, less what `omit` names (see the module docstring)."""
    left_out = _omit_rule(config, {omit} if isinstance(omit, str) else set(omit))
    values = {k: v for k, v in config.to_dict().items() if v is not None and not left_out(k, v)}
    for key in ("data", "eval_data"):
        if key in values:
            values[key] = yaml_value_of_data(values[key], field=key)
    if "metric" in values:  # a function by its import path; one defined in a notebook cannot be written down
        from nbtune.engine.evaluation.metrics import metric_spec_json

        values["metric"] = metric_spec_json(values["metric"])
    return yaml.safe_dump(values, sort_keys=False, allow_unicode=True)


def yaml_value_of_data(value: Any, *, field: str = "data") -> Any:
    """`data` as YAML can hold it: a name or path as text, data in memory as its list of rows."""
    if isinstance(value, (str, Path)):
        return str(value)
    from nbtune.data.loading import load_records

    return load_records(value, field=field).to_list()


def _omit_rule(config: RunConfig, omit: set[str]) -> Callable[[str, Any], bool]:
    """Whether `omit` leaves out a key with a value; unknown words in `omit` are refused by name."""
    defaults = _defaults(config)
    for word in omit:
        if word not in OMIT_WORDS and word not in defaults:
            hint = did_you_mean(word, [*OMIT_WORDS, *defaults])
            raise ConfigError(f"`omit` names `{word}`, which is neither a key of this config nor one of "
                              f"{', '.join(OMIT_WORDS)}.{hint}", field="omit")

    def left_out(key: str, value: Any) -> bool:
        if key in omit:
            return True
        if "derived" in omit and key in config.derived and _same(value, config.derived[key]):
            return True
        return "defaults" in omit and key not in ALWAYS_WRITTEN and _same(value, defaults.get(key))

    return left_out


def _defaults(config: RunConfig) -> dict[str, Any]:
    """Every key `config` can have with its declared default: run settings, its objective's keys, then its
    method's options."""
    from nbtune.methods import get_method
    from nbtune.objectives.registry import get_objective

    settings = {f.name: f.default for f in dataclasses.fields(config) if f.metadata.get("param") is not None}
    # An option's default as `check` keeps it (`q_proj,v_proj` becomes a list), as the config holds it.
    options = {p.name: p.check(p.default) for p in get_method(config.method).params}
    return {**settings, **get_objective(config.objective).default_options(), **options}


def _same(value: Any, default: Any) -> bool:
    # A DataFrame compared with `==` answers with a DataFrame, not a bool; data in memory is never a default.
    return isinstance(value, _PLAIN) and value == default


__all__ = ["OMIT_WORDS", "config_text", "yaml_value_of_data"]
