"""The README's code map ("Where the code is") cannot drift from the package: every package of nbtune has its
line there (what lives there, and the file to read first, which exists), and the map names no package that is
gone. A package added or removed without its line fails here."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nbtune"


def packages() -> list[str]:
    """Every package of nbtune as its folder, 'nbtune/engine/training/' (nbtune itself too)."""
    return sorted(f"{p.parent.relative_to(ROOT).as_posix()}/" for p in PACKAGE.rglob("__init__.py"))


def code_map() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(r"^## Where the code is\n(.*?)(?=^## )", readme, flags=re.S | re.M)
    assert found, "README.md has no '## Where the code is' section"
    return found.group(1)


def map_lines() -> dict[str, str]:
    """Package folder -> its bullet in the map (a bullet starts with the folder in backticks)."""
    lines = {}
    for bullet in re.split(r"\n(?=- )", code_map()):
        named = re.match(r"- \*{0,2}`(nbtune/[\w/]*)`", bullet.strip())
        if named:
            lines[named.group(1) if named.group(1).endswith("/") else named.group(1) + "/"] = bullet
    return lines


def test_every_package_has_its_line_in_the_code_map():
    missing = [p for p in packages() if p not in map_lines()]
    assert not missing, f"add a line to README's 'Where the code is' for: {', '.join(missing)}"


def test_the_code_map_names_no_package_that_is_gone():
    gone = [p for p in map_lines() if p not in packages()]
    assert not gone, f"README's code map names packages that no longer exist: {', '.join(gone)}"


def test_each_line_names_a_file_to_read_first_that_exists():
    for folder, bullet in map_lines().items():
        files = re.findall(r"`([\w/]+\.py)`", bullet)
        assert files, f"the code map's line for {folder} names no file to read first"
        first = files[0] if "/" in files[0] else folder + files[0]
        assert (ROOT / first).is_file(), f"{folder}: the file to read first, {first}, does not exist"


def test_the_rule_finds_a_missing_line(monkeypatch):
    monkeypatch.setattr(__name__ + ".code_map", lambda: "- `nbtune/config/` settings: read `run_config.py`\n")
    assert "nbtune/engine/" not in map_lines() and "nbtune/config/" in map_lines()
