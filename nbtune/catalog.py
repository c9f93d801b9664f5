"""`nbtune.methods()`: the registered methods with their options, defaults and help, for people."""

from __future__ import annotations

from nbtune.methods import all_methods, get_method
from nbtune.methods.registry import MethodSpec


class MethodCatalog(tuple):
    """The methods as a tuple of `MethodSpec`s that prints as a readable list."""

    def __repr__(self) -> str:
        return "\n\n".join(spec.describe() for spec in self)

    def _repr_markdown_(self) -> str:
        rows = ["| method | what it does | options (default) |", "|---|---|---|"]
        for spec in self:
            options = ", ".join(f"`{p.name}` ({p.default!r})" for p in spec.params) or "none"
            rows.append(f"| `{spec.name}` | {spec.summary} | {options} |")
        return "\n".join(rows)

    def names(self) -> list[str]:
        return [spec.name for spec in self]


def methods(name: str | None = None) -> MethodCatalog | MethodSpec:
    """All registered methods (printable), or the one called `name`."""
    if name is not None:
        return get_method(name)
    return MethodCatalog(all_methods())
