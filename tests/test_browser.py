"""nbtune in a real browser: JupyterLab and Notebook 7 on localhost, driven by Playwright in Debian's Chromium.

Each test opens a notebook, runs `%%finetune --background` on a tiny random Llama, and checks the page
itself: the live panel renders, its loss chart gains points, memory and progress update, Stop ends the
run early and says so, the kernel still answers, and the static snapshot replaces the widget. The picker
test chooses a method, edits a number, presses "Insert cell" and reads the cell it wrote.

Screenshots land in tests/artifacts/ (ignored by git). Without /usr/bin/chromium the module is skipped,
except in CI (CI=true), where that is a failure: `make test` installs chromium.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from browser_support import (
    ARTIFACTS,
    CELL,
    LONG,
    SHORT,
    JupyterServer,
    cell,
    chromium,
    lab_server,
    new_page,
    open_notebook,
    require_browser,
    run_cell,
)

STEPS = 1000  # far more than the test lets it train (about 50): Stop always comes first


@pytest.fixture(scope="module")
def jupyter(tmp_path_factory):
    """A JupyterLab server whose root holds the notebooks and a small jsonl data file (32 demo rows)."""
    require_browser()
    with lab_server(tmp_path_factory) as server:
        yield server


@pytest.fixture(scope="module")
def browser(jupyter):
    ARTIFACTS.mkdir(exist_ok=True)
    for old in ARTIFACTS.glob("browser-*.png"):  # a human looks at these: only this run's
        old.unlink()
    with chromium() as launched:
        yield launched


@pytest.fixture
def page(browser, jupyter):
    with new_page(browser, jupyter) as opened:
        yield opened


# ---------------------------------------------------------------------------- notebooks
def write_notebook(jupyter: JupyterServer, name: str, sources: list[str]) -> str:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    nbformat.write(nb, jupyter.root / name)
    return name


def finetune_cell(model_dir: Path, name: str) -> str:
    return (f"%%finetune {name} --background\n"
            f"model: {model_dir}\n"
            "data: train.jsonl\n"
            f"steps: {STEPS}\n"
            "batch_size: 2\n"
            "metric: none\n"
            "save: false")


def picker_cell(model_dir: Path) -> str:
    return f"import nbtune\nnbtune.picker(model={str(model_dir)!r})"


# ---------------------------------------------------------------------------- page reading
def wait_executed(page, index: int, timeout: float = LONG) -> None:
    """Until cell `index` shows an execution count ([3]:), i.e. the kernel has answered it."""
    page.wait_for_function(
        """(i) => { const c = document.querySelectorAll('.jp-Notebook .jp-Cell')[i];
                    return !!c && /\\[\\d+\\]/.test(c.querySelector('.jp-InputPrompt').innerText); }""",
        arg=index, timeout=timeout)


# Points on the live panel's raw-loss polyline in cell i (0 before the first step).
POINTS_JS = """(i) => { const c = document.querySelectorAll('.jp-Notebook .jp-Cell')[i];
                        const line = c.querySelector('.widget-html-content svg.nbtune-loss polyline');
                        return line ? line.getAttribute('points').trim().split(/\\s+/).length : 0; }"""


def chart_points(page, index: int) -> int:
    return page.evaluate(POINTS_JS, index)


def wait_for_points(page, index: int, at_least: int) -> int:
    page.wait_for_function(f"([i, n]) => ({POINTS_JS})(i) >= n", arg=[index, at_least], timeout=LONG)
    return chart_points(page, index)


# Records every distinct text of the panel's memory table and progress line in cell `i`, from before the
# cell runs: a MutationObserver sees states that polling could miss on a fast machine.
RECORD_JS = """(i) => {
  const c = document.querySelectorAll('.jp-Notebook .jp-Cell')[i];
  const rec = window.__nbtune = {memory: [], progress: [], status: []};
  const push = (list, v) => { if (list[list.length - 1] !== v) list.push(v); };
  const look = () => {
    for (const el of c.querySelectorAll('.widget-html-content')) {
      const t = el.innerText.trim();
      if (el.querySelector('.nbtune-memory')) push(rec.memory, t);
      else if (/^step \\d+\\//.test(t)) push(rec.progress, t);
      else if (/ · /.test(t)) push(rec.status, t);
    }
  };
  new MutationObserver(look).observe(c, {subtree: true, childList: true, characterData: true});
}"""


def no_widget_errors(page) -> None:
    errors = page.get_by_text("Error displaying widget")
    assert errors.count() == 0, f"a widget failed to render: {errors.first.inner_text()}"


def shot(page, name: str, target=None) -> None:
    (target or page).screenshot(path=str(ARTIFACTS / f"browser-{name}.png"))


# ---------------------------------------------------------------------------- the two flows
def check_training_panel(page, index: int, label: str) -> None:
    """Run the %%finetune --background cell `index`, watch its panel, press Stop, check the snapshot;
    the cell after it is `print(1+1)`."""
    from playwright.sync_api import expect

    target = cell(page, index)
    page.evaluate(RECORD_JS, index)
    run_cell(page, index)

    # The panel renders, and its loss chart gains points while training.
    stop = target.locator("button.widget-button", has_text="Stop")
    expect(stop).to_be_visible(timeout=LONG)
    no_widget_errors(page)
    first = wait_for_points(page, index, 3)
    second = wait_for_points(page, index, first + 3)
    assert second >= first + 3, (first, second)
    expect(target.locator(".widget-html-content", has_text="running").first).to_be_visible()
    bar = target.locator(".widget-hprogress .progress-bar")
    assert float(re.search(r"width:\s*([\d.]+)%", bar.get_attribute("style")).group(1)) > 0
    shot(page, f"{label}-training")

    # Stop: the run ends after the current step, well before its planned steps, and says so.
    stop.click()
    snapshot = target.locator(".nbtune-snapshot")
    expect(snapshot).to_be_visible(timeout=LONG)
    expect(snapshot).to_contain_text("stopped")
    expect(snapshot.locator("svg.nbtune-loss")).to_be_visible()
    expect(snapshot.locator("table.nbtune-metrics")).to_contain_text("train_loss")
    expect(snapshot.locator("table.nbtune-memory")).to_contain_text("RSS peak")
    assert target.locator(".widget-button").count() == 0, "the live widget should be replaced by the snapshot"
    trained = len(snapshot.locator("svg.nbtune-loss polyline").first.get_attribute("points").split())
    assert second <= trained < STEPS, f"the snapshot shows {trained} steps; Stop came after {second}"

    record = page.evaluate("window.__nbtune")
    steps = [int(re.match(r"step (\d+)/(\d+)", t).group(1)) for t in record["progress"]]
    totals = {int(re.match(r"step \d+/(\d+)", t).group(1)) for t in record["progress"]}
    assert len(steps) >= 2 and steps == sorted(steps) and steps[-1] > steps[0], record["progress"]
    assert totals == {STEPS} and steps[-1] < STEPS, record["progress"]
    assert steps[-1] <= trained, f"live panel's last step {steps[-1]}, snapshot's chart {trained} points"
    assert len(record["memory"]) >= 2, f"the memory table never changed: {record['memory']}"
    assert re.search(r"RSS now\s+[\d,]+ MB", record["memory"][-1]), record["memory"]
    assert any("running" in s for s in record["status"]), record["status"]
    no_widget_errors(page)

    # The kernel is alive: the next cell runs and prints.
    run_cell(page, index + 1)
    wait_executed(page, index + 1)
    expect(cell(page, index + 1).locator(".jp-OutputArea-output")).to_have_text("2", timeout=SHORT)
    shot(page, f"{label}-stopped")


def check_picker(page, index: int, label: str, model_dir: Path) -> None:
    """Run the picker cell `index`, choose DoRA, set r to 16, press Insert cell, read the new cell below it."""
    from playwright.sync_api import expect

    import nbtune

    target = cell(page, index)
    run_cell(page, index)
    insert = target.locator("button.widget-button", has_text="Insert cell")
    expect(insert).to_be_visible(timeout=LONG)
    no_widget_errors(page)
    estimates = target.locator(".widget-html-content", has_text="trainable parameters")
    expect(estimates).to_be_visible()

    method = target.locator(".widget-dropdown", has=page.locator("label", has_text="method")).locator("select")
    value = next(v for v in method.locator("option").evaluate_all("os => os.map(o => o.value)")
                 if v.startswith("dora "))
    method.select_option(value=value)
    textarea = target.locator(".widget-textarea textarea")
    expect(textarea).to_have_value(re.compile(r"^method: dora$", re.M))
    before = estimates.inner_text()

    rank = target.locator(".widget-text", has=page.locator("label", has_text=re.compile(r"^r$"))).locator("input")
    rank.fill("16")
    rank.press("Enter")  # IntText sends its value on Enter (or blur)
    expect(textarea).to_have_value(re.compile(r"^r: 16$", re.M))
    expect(estimates).not_to_have_text(before)  # r 8 -> 16 doubles the trainable parameters
    insert.scroll_into_view_if_needed()  # the form is taller than Notebook 7's viewport: show its cell text
    shot(page, f"{label}-picker")

    # What the same choices give in this process: the cell text is nbtune's, not the page's.
    reference = nbtune.picker(model=str(model_dir))
    reference.method.value = "dora"
    reference.options["r"].value = 16
    expected = reference.cell_text()
    assert textarea.input_value() == expected

    cells_before = page.locator(CELL).count()
    insert.click()
    expect(page.locator(CELL)).to_have_count(cells_before + 1, timeout=SHORT)
    inserted = cell(page, index + 1).locator(".jp-InputArea-editor")
    expect(inserted).to_contain_text("%%finetune", timeout=SHORT)
    text = inserted.inner_text().replace("\u00a0", " ").strip()
    assert text == expected, f"inserted:\n{text}\nexpected:\n{expected}"
    assert f"model: {model_dir}" in text and "method: dora" in text and "r: 16" in text
    inserted.scroll_into_view_if_needed()
    shot(page, f"{label}-inserted")


# ---------------------------------------------------------------------------- tests
def test_jupyterlab_panel_trains_stops_and_leaves_a_snapshot(page, jupyter, tiny_model_dir):
    name = write_notebook(jupyter, "lab-panel.ipynb",
                          ["%load_ext nbtune", finetune_cell(tiny_model_dir, "lab_run"), "print(1+1)"])
    with jupyter.explained(page, "lab-panel"):
        open_notebook(page, jupyter, jupyter.url(f"lab/tree/{name}", "reset"), name, timeout=LONG)
        assert page.locator("body[data-notebook]").count() == 0  # JupyterLab's shell, not Notebook 7's
        run_cell(page, 0)
        wait_executed(page, 0)
        check_training_panel(page, 1, "lab")


def test_jupyterlab_picker_inserts_the_equivalent_cell(page, jupyter, tiny_model_dir):
    name = write_notebook(jupyter, "lab-picker.ipynb", [picker_cell(tiny_model_dir), "print('after')"])
    with jupyter.explained(page, "lab-picker"):
        open_notebook(page, jupyter, jupyter.url(f"lab/tree/{name}", "reset"), name, timeout=LONG)
        check_picker(page, 0, "lab", tiny_model_dir)


def test_notebook7_panel_and_picker(page, jupyter, tiny_model_dir):
    """The same two flows in Notebook 7's single-document UI (/notebooks/...), served by the same server."""
    name = write_notebook(jupyter, "nb7.ipynb", ["%load_ext nbtune", finetune_cell(tiny_model_dir, "nb7_run"),
                                                 "print(1+1)", picker_cell(tiny_model_dir), "print('after')"])
    with jupyter.explained(page, "notebook7"):
        open_notebook(page, jupyter, jupyter.url(f"notebooks/{name}"), name, timeout=LONG)
        assert page.locator('body[data-notebook="notebooks"]').count() == 1  # Notebook 7's shell
        run_cell(page, 0)
        wait_executed(page, 0)
        check_training_panel(page, 1, "notebook7")
        check_picker(page, 3, "notebook7", tiny_model_dir)


# ---------------------------------------------------------------------------- evaluation you can read
# The computed background of the first element matching a selector in cell i: the highlight really shows
# (a frontend that dropped the inline styles or the classes would leave it transparent).
BACKGROUND_JS = """([i, selector]) => { const c = document.querySelectorAll('.jp-Notebook .jp-Cell')[i];
                                         const el = c.querySelector(selector);
                                         return el ? getComputedStyle(el).backgroundColor : null; }"""


def background(page, index: int, selector: str) -> str | None:
    return page.evaluate(BACKGROUND_JS, [index, selector])


def test_jupyterlab_shows_the_preview_sample_answers_and_the_predictions_table(page, jupyter, tiny_model_dir):
    """`--preview` highlights the loss tokens, a run with `sample_every` leaves its answers in the snapshot, and
    `run.predictions()` renders its table with the differences from the reference highlighted."""
    from playwright.sync_api import expect

    config = (f"model: {tiny_model_dir}\ndata: train.jsonl\neval_split: 0.25\nsteps: 4\nbatch_size: 2\n"
              "metric: [exact_match, token_f1]\nmetric_samples: 4\nsample_every: 2\nsave: false")
    name = write_notebook(jupyter, "lab-evaluation.ipynb", [
        "%load_ext nbtune\nimport nbtune", f"%%finetune ev --preview\n{config}", f"%%finetune ev\n{config}",
        "nbtune.runs['ev'].predictions()"])
    transparent = (None, "rgba(0, 0, 0, 0)", "transparent")
    with jupyter.explained(page, "lab-evaluation"):
        open_notebook(page, jupyter, jupyter.url(f"lab/tree/{name}", "reset"), name, timeout=LONG)
        for index in range(2):
            run_cell(page, index)
            wait_executed(page, index)
        # each output is checked right after its cell: JupyterLab may detach cells scrolled out of view
        expect(cell(page, 1)).to_contain_text("carries loss", timeout=LONG)
        assert background(page, 1, ".nbt-loss") not in transparent
        shot(page, "lab-preview")
        run_cell(page, 2)
        wait_executed(page, 2)
        no_widget_errors(page)
        snapshot = cell(page, 2).locator(".nbtune-snapshot")
        expect(snapshot).to_be_visible(timeout=LONG)
        expect(snapshot).to_contain_text("finished")
        expect(snapshot).to_contain_text("answers by step")
        run_cell(page, 3)
        wait_executed(page, 3)
        table = cell(page, 3).locator(".nbtune-pred")
        expect(table).to_contain_text("run 'ev': 4 rows")
        expect(table).to_contain_text("base answer")
        assert background(page, 3, ".nbtune-pred td .extra, .nbtune-pred td .same, .nbtune-pred td .miss") \
            not in transparent
        table.scroll_into_view_if_needed()
        shot(page, "lab-evaluation")


def test_jupyterlab_sweep_panel_shows_trials_stops_and_leaves_a_snapshot(page, jupyter, tiny_model_dir):
    """A `--background` sweep's panel: the running trial's loss chart gains points, the trials table fills,
    Stop ends the sweep after the current step, and a static snapshot with the table replaces the widget."""
    from playwright.sync_api import expect

    sweep = (f"%%finetune sw --background\nmodel: {tiny_model_dir}\ndata: train.jsonl\neval_split: 0.25\n"
             f"steps: 60\nbatch_size: 2\nmetric: none\nsave: false\n"
             "sweep:\n  lr: [0.001, 0.002, 0.003, 0.004]\n  trials: 4")
    name = write_notebook(jupyter, "lab-sweep.ipynb", ["%load_ext nbtune", sweep, "print(1+1)"])
    with jupyter.explained(page, "lab-sweep"):
        open_notebook(page, jupyter, jupyter.url(f"lab/tree/{name}", "reset"), name, timeout=LONG)
        run_cell(page, 0)
        wait_executed(page, 0)
        target = cell(page, 1)
        run_cell(page, 1)
        stop = target.locator("button.widget-button", has_text="Stop")
        expect(stop).to_be_visible(timeout=LONG)
        no_widget_errors(page)
        wait_for_points(page, 1, 3)  # the running trial's loss chart
        expect(target.locator(".nbtune-trials").first).to_contain_text("running", timeout=LONG)
        shot(page, "lab-sweep-running")
        stop.click()
        snapshot = target.locator(".nbtune-sweep-snapshot")
        expect(snapshot).to_be_visible(timeout=LONG)
        expect(snapshot).to_contain_text("stopped")
        assert target.locator(".widget-button").count() == 0  # the live widget is gone, the snapshot stays
        run_cell(page, 2)  # the kernel still answers
        expect(cell(page, 2)).to_contain_text("2", timeout=LONG)
        shot(page, "lab-sweep-stopped")
