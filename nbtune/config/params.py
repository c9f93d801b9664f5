"""Typed, documented, range-checked settings: one `Param` describes a config key or a method hyperparameter.

The same description feeds validation (with one-line messages naming the key), `nbtune.methods()`,
the CLI's help and the notebook picker's fields and tooltips, so the help text lives in exactly one place.

    >>> Param("r", "int", 8, "LoRA rank.", min=1).check(16)
    16
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from nbtune.errors import ConfigError

Kind = Literal["int", "float", "bool", "str", "names", "any"]


@dataclass(frozen=True)
class Param:
    """One setting: its name, kind, default, help text and allowed values."""

    name: str
    kind: Kind
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False
    nullable: bool = False

    def check(self, value: Any) -> Any:
        """Return `value` converted to this kind, or raise `ConfigError` naming the key and the fix."""
        if value is None:
            if self.nullable or self.default is None:
                return None
            raise ConfigError(f"`{self.name}` cannot be empty; {self._expected()}.", field=self.name)
        value = self._coerce(value)
        self._check_choice(value)
        self._check_range(value)
        return value

    def describe(self) -> str:
        """One line: name, kind, default, allowed values, help."""
        allowed = f", one of {'|'.join(self.choices)}" if self.choices else self._bounds_text()
        return f"{self.name} ({self.kind}, default {self.default!r}{allowed}): {self.help}"

    def _coerce(self, value: Any) -> Any:
        kind = self.kind
        # bool is an int subclass in Python; `r: true` is a typo, not a rank of 1.
        if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind == "int" and isinstance(value, float) and value.is_integer():
            return int(value)
        if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind == "bool" and isinstance(value, bool):
            return value
        if kind == "str" and isinstance(value, str):
            return value
        if kind == "names":
            if isinstance(value, str):
                # One plain name means that module (`q_proj` -> [q_proj]); peft would read a lone string as a
                # regular expression over full module paths, which `q_proj` never matches. Keywords such as
                # 'all-linear' and real expressions stay strings.
                if re.fullmatch(r"[A-Za-z0-9_.]+(\s*,\s*[A-Za-z0-9_.]+)*", value):  # also "q_proj,v_proj"
                    return [name.strip() for name in value.split(",")]
                return value
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                return list(value)
        if kind == "any":
            return value
        raise ConfigError(
            f"`{self.name}` must be {self._expected()}, got {type(value).__name__} {value!r}.",
            field=self.name,
        )

    def _check_choice(self, value: Any) -> None:
        if self.choices is None or value in self.choices:
            return
        from nbtune.errors import did_you_mean

        hint = did_you_mean(str(value), self.choices)
        raise ConfigError(
            f"`{self.name}` is {value!r}, which is not one of {', '.join(self.choices)}.{hint}",
            field=self.name,
        )

    def _check_range(self, value: Any) -> None:
        if self.kind not in ("int", "float"):
            return
        too_low = self.min is not None and (value <= self.min if self.min_exclusive else value < self.min)
        too_high = self.max is not None and (value >= self.max if self.max_exclusive else value > self.max)
        if too_low or too_high:
            raise ConfigError(
                f"`{self.name}` is {value!r}, outside its range{self._bounds_text()}; {self.help}",
                field=self.name,
            )

    def _expected(self) -> str:
        return {
            "int": "an integer",
            "float": "a number",
            "bool": "true or false",
            "str": "a string",
            "names": "a name or a list of names",
            "any": "a value",
        }[self.kind]

    def _bounds_text(self) -> str:
        if self.min is None and self.max is None:
            return ""
        low = "" if self.min is None else ("(" if self.min_exclusive else "[") + _number(self.min)
        high = "" if self.max is None else _number(self.max) + (")" if self.max_exclusive else "]")
        low = low or "(-inf"
        high = high or "inf)"
        return f" {low}, {high}"


class FrozenDict(dict):
    """A dict that cannot be changed once built: a parsed `RunConfig`'s options and derived values. Still a
    dict (JSON, YAML via dict(), ==, copy, pickle), so every reader keeps working; a writer gets a TypeError
    that says how to change a config instead."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a parsed RunConfig does not change: make a new one with config.with_changes(key=value)")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = __ior__ = _refuse  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenDict, (dict(self),))

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenDict:
        import copy

        return FrozenDict(copy.deepcopy(dict(self), memo))


# The run settings (RunConfig's fields as `Param`s), declared by nbtune/config/run_config.py as it loads: the
# registries below the config (methods', objectives') refuse an option of their own that takes a run setting's
# name, and a sweep block's check reads a setting's `Param`, without importing the config, which imports them.
_RUN_SETTINGS: dict[str, Param] = {}
_NESTED: tuple[str, ...] = ()


def declare_run_settings(params: dict[str, Param], nested: tuple[str, ...]) -> None:
    """Called once, by nbtune/config/run_config.py: the run settings, and the names of its nested mappings."""
    global _NESTED
    _RUN_SETTINGS.clear()
    _RUN_SETTINGS.update(params)
    _NESTED = tuple(nested)


def run_settings() -> dict[str, Param]:
    """The run settings' `Param`s by name, in declaration order; nbtune.config declares them on import, and
    `import nbtune` imports it before any registry or sweep block can be checked."""
    if not _RUN_SETTINGS:
        raise RuntimeError("nbtune.config has not declared the run settings yet: import nbtune (or nbtune.config) "
                           "first.")
    return dict(_RUN_SETTINGS)


def run_setting_names() -> tuple[str, ...]:
    """RunConfig's keys (settings, `options`, `objective_options`, `derived`): no method or objective key may
    take one of these names."""
    return (*run_settings(), *_NESTED)


def _number(value: float) -> str:
    """1048576 as `1048576`, not `1.04858e+06`; 1e-08 and 0.5 as they are."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"
