"""Parsing a `%%finetune` cell, with no IPython in sight: YAML body, `{{ name }}` values, defaults.

Only plain variable names resolve inside `{{ }}`; anything that looks like code (calls, attributes,
indexing) is refused, so a cell can never run code through its config. A `{{ x }}` that is a whole
YAML value becomes the object itself (a DataFrame, a list of dicts, a number); inside a longer string
it becomes `str(x)`.

    >>> parse_cell("steps: {{ n }}\\nr: 8", {"n": 30})
    {'steps': 30, 'r': 8}
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nbtune.config import load_yaml
from nbtune.errors import ConfigError

_TEMPLATE = re.compile(r"\{\{(.*?)\}\}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_cell(body: str, namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The cell's YAML as a dict, with `{{ name }}` replaced by values from `namespace`."""
    values: dict[str, Any] = {}

    def placeholder(match: re.Match[str]) -> str:
        name = match.group(1).strip()
        if not _NAME.fullmatch(name):
            raise ConfigError(f"`{{{{ {name} }}}}`: only a plain variable name can go inside {{{{ }}}}, "
                              "not an expression; compute it in a cell above.")
        return _stash(name, namespace, values)

    # YAML comments may mention `{{ name }}` (a hint, an example): only the code part of a line counts.
    lines = [(code, comment) for code, comment in (_split_comment(line) for line in (body or "").splitlines())]
    text = "\n".join(_TEMPLATE.sub(placeholder, code) + comment for code, comment in lines)
    if any("{{" in code or "}}" in code for code in (_TEMPLATE.sub("", c) for c, _ in lines)):
        raise ConfigError("an unclosed `{{` or `}}` in the cell; write `{{ name }}`.")
    try:
        loaded = load_yaml(text)
    except Exception as exc:  # yaml's errors carry a position; keep the first line
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"the cell is not valid YAML{where}: {getattr(exc, 'problem', exc)}.") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError("the cell must hold `key: value` lines (YAML), e.g. `method: lora`.")
    return _substitute(loaded, values)


# IPython expands `{x}` in a magic's line and turns the escaped `{{ x }}` into `{ x }` before the magic
# sees it: so a `{ name }` still in the line is what the user wrote as `{{ name }}`.
_LINE_TEMPLATE = re.compile(r"\{\{?\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}?")


def line_values(line: str, namespace: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The magic's line with each `{{ name }}` replaced by a placeholder word, and placeholder -> value."""
    values: dict[str, Any] = {}
    return _LINE_TEMPLATE.sub(lambda match: _stash(match.group(1), namespace, values), line), values


def _stash(name: str, namespace: Mapping[str, Any], values: dict[str, Any]) -> str:
    """A placeholder word for the notebook variable `name`, its value kept in `values` under it."""
    if name not in namespace:
        raise ConfigError(f"`{{{{ {name} }}}}`: the notebook has no variable {name!r}; define it above.")
    key = f"__nbtune_value_{len(values)}__"
    values[key] = namespace[name]
    return key


def with_values(text: Any, values: dict[str, Any]) -> Any:
    """A flag's value with the placeholders of `line_values` put back (the object itself if it is one)."""
    return _substitute(text, values) if isinstance(text, str) else text


def _split_comment(line: str) -> tuple[str, str]:
    """(code, comment) of a YAML line: a `#` outside quotes at the start or after a space begins a comment."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i], line[i:]
    return line, ""


def _substitute(node: Any, values: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        return {k: _substitute(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, values) for v in node]
    if isinstance(node, str):
        if node in values:
            return values[node]
        for key, value in values.items():
            node = node.replace(key, str(value))
    return node


def project_defaults(start: Path | None = None) -> dict[str, Any]:
    """`[tool.nbtune]` from the nearest pyproject.toml at or above `start` (default: the working dir)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: no TOML reader in the standard library
        return {}
    folder = (start or Path.cwd()).resolve()
    for candidate in (folder, *folder.parents):
        path = candidate / "pyproject.toml"
        if path.is_file():
            try:
                data = tomllib.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{path} is not valid TOML: {exc}") from None
            section = data.get("tool", {}).get("nbtune", {})
            if not isinstance(section, dict):
                raise ConfigError(f"{path}: [tool.nbtune] must be a table of config keys.")
            return dict(section)
    return {}
