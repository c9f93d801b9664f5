"""What a saved notebook keeps: static outputs only, so that reopened without its kernel (JupyterLab, nbconvert,
GitHub) it shows the tables and charts, never "Error displaying widget: model not found".

A widget's output is saved with the mime type application/vnd.jupyter.widget-view+json, which a frontend
prefers over any HTML beside it, while the widget's state is not saved: reopened, the page has no model
for it. The notebook is executed in a real kernel (nbclient) and saved as JupyterLab saves it; its outputs'
mime types are checked directly, then it is opened in JupyterLab in Chromium without running it and the
page is read (skipped without /usr/bin/chromium, failed then in CI, as in test_browser.py). Screenshots:
tests/artifacts/saved-*.png.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from browser_support import (
    ARTIFACTS,
    LONG,
    WIDGET_VIEW,
    cell,
    chromium,
    execute_and_save,
    lab_server,
    new_page,
    open_notebook,
    output_mimes,
    require_browser,
)

import nbtune
from nbtune.engine.training import progress

for _package in ("ipykernel", "nbclient"):  # make test installs them (nbtune[jupyter])
    pytest.importorskip(_package)

STATIC = ["text/html", "text/plain"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("saved-notebook")
    return execute_and_save(root, "saved.ipynb", tiny_model_dir)


def test_a_saved_notebook_holds_no_widget_output(saved):
    import nbformat

    mimes = output_mimes(saved)
    assert [m for m in mimes if WIDGET_VIEW in m[2]] == []
    cells = nbformat.read(saved, as_version=4).cells
    by_cell = {i: [(kind, data) for j, kind, data in mimes if j == i] for i in range(len(cells))}
    assert by_cell[3] == [("execute_result", STATIC)]  # nbtune.compare(...): the table, as HTML
    assert by_cell[4] == [("execute_result", STATIC)]  # run.predictions()
    for index in (1, 2, 5):  # each run cell's panel is its static snapshot by the time the notebook is saved
        first = cells[index].outputs[0]
        assert first["output_type"] == "display_data" and sorted(first["data"]) == STATIC
        assert "nbtune-snapshot" in first["data"]["text/html"]
    assert "stopped" in cells[5].outputs[0]["data"]["text/html"]  # the background run Stop ended
    # the answering bars of the evaluated runs were lines in their cell, emptied when they closed
    lines = [o["data"]["text/plain"] for o in cells[1].outputs[1:] if sorted(o.get("data", {})) == ["text/plain"]]
    assert lines[:-1] == ["", ""] and lines[-1].startswith("<Run 'ev', lora, finished")


class RecordingDisplay:
    """Stands in for IPython.display.display with display ids: every text each display showed, in order."""

    def __init__(self) -> None:
        self.shown: list[list[str]] = []

    def __call__(self, data, raw=False, display_id=None):
        assert raw and display_id is True
        texts = [data["text/plain"]]
        self.shown.append(texts)

        class Handle:
            def update(self, data, raw=False):
                texts.append(data["text/plain"])

        return Handle()


@pytest.fixture
def shown(monkeypatch):
    import IPython.display

    recorder = RecordingDisplay()
    monkeypatch.setattr(IPython.display, "display", recorder)
    return recorder.shown


def test_the_notebook_bar_is_a_line_updated_in_place_and_emptied_when_it_closes(shown):
    from nbtune.magics.display import LineBar

    with LineBar(total=3, desc="ev: answering", unit="row", leave=False, mininterval=0) as bar:
        for _ in range(3):
            bar.update(1)
    assert len(shown) == 1  # one output, updated: not a new line per update
    texts = shown[0]
    assert texts[0].startswith("ev: answering:   0%") and any("3/3" in t for t in texts)
    assert texts[-1] == ""


def test_the_notebook_bar_draws_nothing_from_a_background_thread(shown):
    from nbtune.magics.display import LineBar

    def answer() -> None:
        with LineBar(total=2, desc="bg: answering", unit="row", leave=False) as bar:
            bar.update(2)

    thread = threading.Thread(target=answer)
    thread.start()
    thread.join()
    assert shown == []  # it would land under whichever cell runs at the time


def test_the_engine_bar_is_never_a_widget():
    from tqdm.notebook import tqdm as notebook_tqdm

    with progress.progress_bar(total=1, desc="x", unit="row") as bar:
        assert not isinstance(bar, notebook_tqdm)


class Recorder:
    """A bar that records what it was asked to show."""

    made: list[str] = []

    def __init__(self, *, total, desc, unit, leave, disable):
        Recorder.made.append(desc)

    def update(self, n=1):
        pass

    def set_postfix_str(self, text):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def recorded():
    Recorder.made = []
    progress.draw_progress_with(Recorder)
    yield Recorder.made
    progress.draw_progress_with(None)


def test_answering_and_gguf_export_draw_the_bar_they_are_given(llama_base, demo_rows, recorded, tmp_path):
    pytest.importorskip("gguf")
    run = nbtune.finetune(data=demo_rows, base=llama_base, name="dates", eval_split=0.25, steps=1, batch_size=4,
                          metric="exact_match", metric_samples=2, save=False)
    assert "dates: answering" in recorded and "base model: answering" in recorded
    run.export(tmp_path / "out", format="gguf", quant="f16")
    assert "dates: GGUF f16" in recorded


# ---------------------------------------------------------------------------- the saved notebook reopened
@pytest.fixture(scope="module")
def jupyter(tmp_path_factory):
    require_browser()
    with lab_server(tmp_path_factory) as server:
        yield server


@pytest.fixture(scope="module")
def browser(jupyter):
    ARTIFACTS.mkdir(exist_ok=True)
    for old in ARTIFACTS.glob("saved-*.png"):  # a human looks at these: only this run's
        old.unlink()
    with chromium() as launched:
        yield launched


@pytest.fixture
def page(browser, jupyter):
    with new_page(browser, jupyter) as opened:
        yield opened


def test_jupyterlab_reopens_a_saved_notebook_with_tables_and_no_widget_errors(saved, page, jupyter):
    """The notebook above, executed and saved, opened in JupyterLab without running it: the page shows the
    static snapshots and tables, and no widget line ("Error displaying widget: model not found", or
    "Loading widget..." where no kernel will ever send the widget)."""
    import shutil

    from playwright.sync_api import expect

    path = Path(shutil.copy(saved, jupyter.root / saved.name))
    jupyter.trust(path)  # the user's own notebook: JupyterLab signed it when it saved it
    with jupyter.explained(page, "saved-reopened"):
        open_notebook(page, jupyter, jupyter.url(f"lab/tree/{path.name}", "reset"), path.name, timeout=LONG)
        expect(cell(page, 1).locator(".nbtune-snapshot")).to_be_visible(timeout=LONG)
        # the widget manager restores its state once the kernel is connected (open_notebook waited for
        # that); an output whose widget it lacks turns from "Loading widget..." into the error line then
        page.wait_for_timeout(3000)
        text = page.locator(".jp-Notebook").inner_text()
        for line in ("Error displaying widget", "model not found", "Loading widget"):
            assert line not in text, f"{line!r} in the reopened notebook:\n{text}"
        assert page.locator(".jp-Notebook .widget-button, .jp-Notebook .jupyter-widgets").count() == 0
        for index, status in ((1, "finished"), (2, "finished"), (5, "stopped")):
            expect(cell(page, index).locator(".nbtune-snapshot")).to_contain_text(status)
        expect(cell(page, 1).locator(".nbtune-samples")).to_contain_text("before")
        compare = cell(page, 3).locator(".nbtune-compare")
        for shown in ("ev_lr", "exact_match", "config keys that differ", "per-example agreement"):
            expect(compare).to_contain_text(shown)
        expect(compare.locator("svg polyline").first).to_be_visible()  # the curves, not sanitised away
        expect(cell(page, 4).locator(".nbtune-pred")).to_contain_text("run 'ev': 4 rows")
        page.screenshot(path=str(ARTIFACTS / "saved-reopened.png"), full_page=True)
        for index, label in ((1, "run"), (3, "compare"), (4, "predictions")):
            cell(page, index).scroll_into_view_if_needed()
            cell(page, index).screenshot(path=str(ARTIFACTS / f"saved-{label}.png"))
