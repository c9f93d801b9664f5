"""Config YAML: the safe loader every config text goes through, and reading a config from text or a file.

Split from nbtune/config/run_config.py, which re-exports `load_yaml`.

    >>> load_yaml("lr: 1e-4")
    {'lr': 0.0001}
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from nbtune.errors import ConfigError


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float, as YAML 1.2 does (PyYAML's 1.1 rules need `1.0e-4`)."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """Parse YAML safely (never constructs Python objects), with YAML 1.2 exponent floats."""
    return yaml.load(text, Loader=_Yaml12Loader)


def read_yaml(source: str | Path) -> dict[str, Any]:
    """The `key: value` mapping in `source`: YAML text, or the name of a YAML file."""
    text = str(source)
    # A single line with no `key: value` in it that ends in .yaml or names a file is a file name, not YAML.
    one_line = "\n" not in text and ": " not in text
    is_file_name = one_line and (re.fullmatch(r".+\.ya?ml", text, re.IGNORECASE) is not None or Path(text).is_file())
    path = Path(text) if isinstance(source, Path) or is_file_name else None
    if path is not None:
        if path.is_dir():
            raise ConfigError(f"config file {str(path)!r} is a folder; give the YAML file in it.")
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist.")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"config file {str(path)!r} is not UTF-8 text; save it as UTF-8 YAML.") from None
    try:
        # safe_load: a config never constructs Python objects.
        loaded = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config is not valid YAML{where}: {problem}.") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config must be YAML `key: value` lines, got a {type(loaded).__name__}.")
    return loaded


__all__ = ["load_yaml", "read_yaml"]
