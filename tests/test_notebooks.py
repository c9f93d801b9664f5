"""The shipped notebooks and their Binder configuration: committed clean, and the quickstart really runs."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]-*.ipynb"))


def _load_execute():
    spec = importlib.util.spec_from_file_location("nb_execute", ROOT / "notebooks" / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_ten_notebooks_of_the_tour_are_shipped():
    names = [p.stem for p in NOTEBOOKS]
    assert names == ["01-quickstart", "02-method-zoo", "03-compare-adapters", "04-qlora-and-memory",
                     "05-your-own-data", "06-runs-that-last", "07-evaluation", "08-sweeps", "09-preference",
                     "10-export"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_valid_and_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "clear the outputs before committing"
    assert notebook.cells[0].cell_type == "markdown" and notebook.cells[0].source.startswith("# ")
    assert any("%load_ext nbtune" in c.source for c in code)


def test_binder_installs_the_torch_that_make_installs():
    pinned = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    requirements = (ROOT / "binder" / "requirements.txt").read_text()
    assert f"torch=={pinned}+cpu" in requirements.split()
    post_build = ROOT / "binder" / "postBuild"
    assert os.access(post_build, os.X_OK) and os.access(ROOT / "binder" / "start", os.X_OK)
    assert "nbtune fetch" in post_build.read_text()  # the model is in the image, not fetched per launch
    assert (ROOT / "binder" / "runtime.txt").read_text().strip().startswith("python-3.")


def test_static_copy_keeps_html_where_a_widget_also_has_it():
    execute = _load_execute()
    both = {"output_type": "display_data", "metadata": {},
            "data": {execute.WIDGET_VIEW: {"model_id": "x"}, "text/html": "<table/>", "text/plain": "t"}}
    widget_only = {"output_type": "display_data", "metadata": {},
                   "data": {execute.WIDGET_VIEW: {"model_id": "y"}, "text/plain": "VBox()"}}
    cell = nbformat.v4.new_code_cell("x", outputs=[nbformat.from_dict(both), nbformat.from_dict(widget_only)])
    notebook = nbformat.v4.new_notebook(cells=[cell])

    static = execute.static_copy(notebook)
    assert execute.WIDGET_VIEW not in static.cells[0].outputs[0].data
    assert static.cells[0].outputs[0].data["text/html"] == "<table/>"
    assert execute.WIDGET_VIEW in static.cells[0].outputs[1].data  # nothing static to show instead
    assert execute.WIDGET_VIEW in notebook.cells[0].outputs[0].data  # the executed notebook is untouched


def test_summary_is_the_stream_output_of_tagged_cells():
    execute = _load_execute()
    tagged = nbformat.v4.new_code_cell("print('a')", outputs=[nbformat.v4.new_output("stream", text="after 90%\n")])
    tagged.metadata["tags"] = ["summary"]
    other = nbformat.v4.new_code_cell("print('b')", outputs=[nbformat.v4.new_output("stream", text="noise\n")])
    assert execute.summary_text(nbformat.v4.new_notebook(cells=[other, tagged])) == "after 90%"


@pytest.mark.integration
def test_the_quickstart_runs_top_to_bottom_and_learns(tmp_path):
    """What `make demo` does: execute the quickstart headless, on the real SmolLM2, into HTML."""
    execute = _load_execute()
    path = tmp_path / "01-quickstart.ipynb"
    shutil.copy(ROOT / "notebooks" / "01-quickstart.ipynb", path)

    notebook, _wall, peak_mb, error = execute.execute(path, timeout=600)

    assert error is None
    summary = execute.summary_text(notebook)
    before, after = (int(x) for x in re.search(r"before (\d+)% -> after (\d+)%", summary).groups())
    assert after >= before + 50, summary  # 40 LoRA steps: about 3% -> about 90%
    assert peak_mb > 500  # the sampler watched the kernel (it holds the 538 MB model), not this process
    assert (tmp_path / "runs" / "quickstart" / "adapter_config.json").exists()
    html = execute.write_html(notebook, path).read_text(encoding="utf-8")
    assert "finished" in html and "<svg" in html  # the panel's final snapshot: status and loss chart
