"""Sweeps in a real Jupyter kernel (issue 29): what an interrupted sweep cell advises is true there
(`nbtune.sweeps[...]`), a `--background` sweep's line follows it to its end and through a resume, and nothing
of a background sweep is drawn into the cells that run meanwhile."""

from __future__ import annotations

from typing import Any

import pytest
from test_kernel import SETUP, Kernel

# Each training step sleeps while SLOW[0] holds (an interrupt or a Stop then lands inside a trial), else
# trains at the tiny model's speed; in the kernel's main thread (a blocking cell) it says it is in a step.
SLOWLY = """
from nbtune.engine.training import loss
import threading, time
SLOW = [True]
_real = loss.AnswerOnlyLossTrainer.compute_loss
def _slow(self, *args, **kwargs):
    if SLOW[0]:
        if threading.current_thread() is threading.main_thread():
            print('IN STEP', flush=True)
        time.sleep(0.3)
    return _real(self, *args, **kwargs)
loss.AnswerOnlyLossTrainer.compute_loss = _slow
"""


def sweep_cell(name: str, flags: str, trials: list[int], steps: int = 6) -> str:
    return (f"%%finetune {name} {flags}\nmethod: lora\ndata: {{{{ rows }}}}\nsteps: {steps}\nbatch_size: 4\n"
            f"metric: none\nsave: false\nsweep:\n  r: {trials}\n")


@pytest.fixture
def kernel(tiny_model_dir, tmp_path):
    from jupyter_client.manager import start_new_kernel

    manager, client = start_new_kernel(kernel_name="python3", cwd=str(tmp_path))
    kernel = Kernel(manager, client)
    try:
        for code in (SETUP.format(model=str(tiny_model_dir)), SLOWLY):
            reply, text = kernel.run(code)
            assert reply["status"] == "ok", text
        yield kernel
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def lines(kernel: Kernel, display_id: str) -> list[str]:
    """The text of every update of the display `display_id`, whichever cell was running when it came."""
    return [m["content"]["data"]["text/plain"] for messages in kernel.outputs.values() for m in messages
            if m["msg_type"] == "update_display_data" and m["content"]["transient"]["display_id"] == display_id]


def shown_line(kernel: Kernel, msg_id: str, starts: str) -> str:
    """The display id of the line the cell `msg_id` showed, starting with `starts`."""
    return next(m["content"]["transient"]["display_id"] for m in kernel.outputs[msg_id]
                if m["msg_type"] == "display_data" and m["content"]["data"].get("text/plain", "").startswith(starts))


def own_output(kernel: Kernel, msg_id: str) -> list[Any]:
    return [m["content"].get("text", m["content"].get("data")) for m in kernel.outputs[msg_id]
            if m["msg_type"] in ("stream", "display_data", "execute_result")]


def test_an_interrupted_sweeps_advice_names_the_sweep_and_it_resumes_from_there(kernel):
    """Issue 29 item 6: the advice named `sweep.resume()`, but the cell raised: no `sweep` existed."""
    cell = kernel.submit(sweep_cell("sw", "--no-panel", [2, 4]))
    assert kernel.drain(cell, until="IN STEP")
    kernel.manager.interrupt_kernel()

    reply = kernel.reply(cell)
    shown = kernel.text(cell)
    assert reply["status"] == "error" and reply["ename"] == "RunInterrupted"
    assert "sweep 'sw' was interrupted with 0 of 2 trials done" in shown and "Traceback" not in shown
    assert "nbtune.sweeps['sw'].resume(), or running the same cell or config again, continues it" in shown
    reply, text = kernel.run("SLOW[0] = False\ns = nbtune.sweeps['sw'].resume()\n"
                             "print(s.status, len(s.records), s.optimize, sorted(r['params']['r'] for r in "
                             "s.records))")
    assert reply["status"] == "ok", text
    assert text.splitlines()[-1] == "finished 2 final_loss [2, 4]"


def test_a_background_sweeps_line_follows_it_and_nothing_lands_in_later_cells(kernel):
    """Issue 29 items 11 and 12: the line under a --background sweep stayed "0 of 3 trials, running" after it
    stopped, finished or resumed; its bars (and each trial's) were drawn under whichever cell ran then."""
    started = kernel.submit(sweep_cell("bg", "--background --no-panel", [2, 4, 8]))
    assert kernel.reply(started)["status"] == "ok"
    first = shown_line(kernel, started, "sweep 'bg': 0 of 3 trials, running")
    stop = kernel.submit("s = nbtune.sweeps['bg']\nwhile not s.records:\n    time.sleep(0.05)\n"
                         "s.stop(); s.wait(120); print(s.status)")
    assert kernel.reply(stop)["status"] == "ok"
    assert own_output(kernel, stop) == ["stopped\n"]  # nothing of the sweep's progress here
    assert lines(kernel, first)[-1].startswith("sweep 'bg': 1 of 3 trials, stopped")
    assert any(" — bg/" in line and ": step " in line for line in lines(kernel, first))  # its progress, in place

    resumed = kernel.submit("SLOW[0] = False\nnbtune.sweeps['bg'].resume(background=True)")
    assert kernel.reply(resumed)["status"] == "ok"
    second = shown_line(kernel, resumed, "sweep 'bg': 1 of 3 trials, running")
    waited = kernel.submit("nbtune.sweeps['bg'].wait(120); print('waited')")
    assert kernel.reply(waited)["status"] == "ok"
    assert own_output(kernel, waited) == ["waited\n"]
    for line in (first, second):  # the first cell's line too: it says what the sweep is now
        assert lines(kernel, line)[-1].startswith("sweep 'bg': 3 of 3 trials, finished"), lines(kernel, line)


def test_the_line_under_a_background_sweeps_panel_says_when_it_finished(kernel):
    """Issue 29 item 12, as reported: under the panel, "0 of 2 trials, running" for good."""
    kernel.run("SLOW[0] = False")
    started = kernel.submit(sweep_cell("pn", "--background", [2, 4]))
    assert kernel.reply(started)["status"] == "ok"
    assert any(m["msg_type"] == "display_data" and "application/vnd.jupyter.widget-view+json" in m["content"]["data"]
               for m in kernel.outputs[started])  # the panel
    line = shown_line(kernel, started, "sweep 'pn': 0 of 2 trials, running")
    waited = kernel.submit("nbtune.sweeps['pn'].wait(120); print('waited')")
    assert kernel.reply(waited)["status"] == "ok"
    assert own_output(kernel, waited) == ["waited\n"]
    assert lines(kernel, line)[-1].startswith("sweep 'pn': 2 of 2 trials, finished")
