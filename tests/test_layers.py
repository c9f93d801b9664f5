"""Layering rules: the engine, methods and data never import notebook libraries; `import nbtune` is cheap."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nbtune"
HEADLESS_LAYERS = ("engine", "methods", "data")
NOTEBOOK_LIBRARIES = {"IPython", "ipywidgets", "traitlets", "anywidget", "ipykernel"}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("layer", HEADLESS_LAYERS)
def test_headless_layers_do_not_import_notebook_libraries(layer):
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files, f"nbtune/{layer} has no modules"
    offenders = {str(f.relative_to(PACKAGE)): sorted(_imported_roots(f) & NOTEBOOK_LIBRARIES) for f in files}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_rule_catches_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from IPython.display import display\n")
    assert "IPython" in _imported_roots(bad)


def test_import_nbtune_loads_neither_torch_nor_ipython():
    code = "import sys, nbtune; print(sorted(m for m in ('torch', 'IPython', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_modules_stay_small():
    sizes = {str(f.relative_to(PACKAGE)): len(f.read_text().splitlines()) for f in PACKAGE.rglob("*.py")}
    assert not {k: v for k, v in sizes.items() if v > 400}
