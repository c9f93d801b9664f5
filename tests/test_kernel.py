"""The magic in a real Jupyter kernel (ipykernel driven by jupyter_client and nbclient): only there do
execute replies, the interrupt and cells queued by "Run All" behave as they do in a notebook.

A failed or interrupted `%%finetune` cell must reply "error", so that the kernel aborts the cells queued
after it, as it does for any failing Python cell; the one red line stays the only thing shown.
"""

from __future__ import annotations

import queue
import time
from pathlib import Path
from typing import Any

import pytest

for _package in ("ipykernel", "jupyter_client", "nbclient"):  # make test installs them (nbtune[jupyter])
    pytest.importorskip(_package)
import nbformat  # noqa: E402

TIMEOUT = 180
# Every kernel gets the tiny model as its default, 16 demo rows as `rows`, and prints "STEP n" from the
# progress bar's step event, which tells the test when training is under way.
SETUP = """
%load_ext nbtune
%config Finetune.defaults = {{'model': {model!r}}}
from nbtune.data.demo import demo_splits
from nbtune.engine.training import events
rows = demo_splits()[0][:16]
_on_step = events.ProgressObserver.on_step
def _print_step(self, run, record):
    print(f"STEP {{record['step']}}", flush=True)
    _on_step(self, run, record)
events.ProgressObserver.on_step = _print_step
import nbtune
"""
CELL = "method: lora\nr: 4\ndata: {{{{ rows }}}}\nsteps: {steps}\nbatch_size: 4\nmetric: none\nsave: false\n"


def cell(name: str, steps: int = 2, **extra: Any) -> str:
    body = CELL.format(steps=steps) + "".join(f"{k}: {v}\n" for k, v in extra.items())
    return f"%%finetune {name} --no-panel\n{body}"


class Kernel:
    """A real ipykernel: send cells (queued, as Run All does), read their replies and outputs."""

    def __init__(self, manager: Any, client: Any) -> None:
        self.manager, self.client = manager, client
        self.outputs: dict[str, list[dict[str, Any]]] = {}

    def submit(self, code: str) -> str:
        msg_id = self.client.execute(code)
        self.outputs[msg_id] = []
        return msg_id

    def run(self, code: str) -> tuple[dict[str, Any], str]:
        """Execute one cell and wait: (reply content, its text output)."""
        msg_id = self.submit(code)
        reply = self.reply(msg_id)
        return reply, self.text(msg_id)

    def reply(self, msg_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            msg = self.client.get_shell_msg(timeout=TIMEOUT)
            if msg["parent_header"].get("msg_id") == msg_id:
                self.drain(msg_id)
                return msg["content"]
        raise TimeoutError(f"no reply to {msg_id}")

    def drain(self, msg_id: str, until: str | None = None) -> bool:
        """Read output messages until the cell `msg_id` is idle (or its text contains `until`)."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                msg = self.client.get_iopub_msg(timeout=1)
            except queue.Empty:
                continue
            parent = msg["parent_header"].get("msg_id")
            if parent in self.outputs:
                self.outputs[parent].append(msg)
            if until is not None and until in self.text(msg_id):
                return True
            if parent == msg_id and msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                return until is None
        raise TimeoutError(f"cell {msg_id} did not finish")

    def text(self, msg_id: str) -> str:
        parts = []
        for msg in self.outputs.get(msg_id, []):
            content = msg["content"]
            if msg["msg_type"] == "stream":
                parts.append(content["text"])
            elif msg["msg_type"] in ("execute_result", "display_data"):
                parts.append(content["data"].get("text/plain", ""))
            elif msg["msg_type"] == "error":
                parts.append("\n".join(content["traceback"]))
        return "".join(parts)


@pytest.fixture
def kernel(tiny_model_dir, tmp_path):
    from jupyter_client.manager import start_new_kernel

    manager, client = start_new_kernel(kernel_name="python3", cwd=str(tmp_path))
    kernel = Kernel(manager, client)
    try:
        reply, text = kernel.run(SETUP.format(model=str(tiny_model_dir)))
        assert reply["status"] == "ok", text
        yield kernel
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def test_a_config_mistake_fails_the_cell_and_run_all_stops_there(kernel):
    reply, _ = kernel.run(cell("a"))
    assert reply["status"] == "ok"
    typo, after = kernel.submit(cell("a").replace("r: 4", "rr: 4")), kernel.submit("print('after')")

    reply = kernel.reply(typo)
    assert reply["status"] == "error" and reply["ename"] == "ConfigError"
    assert "unknown key `rr`" in kernel.text(typo) and "Traceback" not in kernel.text(typo)
    assert kernel.reply(after)["status"] == "aborted"  # the queued cell did not run
    reply, text = kernel.run("print(nbtune.runs['a'].status, nbtune.runs['a'].config.options['r'])")
    assert text.strip() == "finished 4"  # the earlier run of that name is as it was


def test_a_crash_in_training_fails_the_cell_and_tb_shows_the_cause(kernel):
    kernel.run("from nbtune.engine.training import loss\n"
               "def _boom(*args, **kwargs):\n    raise RuntimeError('boom in the loss')\n"
               "loss.AnswerOnlyLossTrainer.compute_loss = _boom")
    crash, after = kernel.submit(cell("crash")), kernel.submit("print('after')")

    reply = kernel.reply(crash)
    assert reply["status"] == "error" and reply["ename"] == "RunFailed"
    shown = kernel.text(crash)
    assert "run 'crash' failed: RuntimeError: boom in the loss" in shown and "Traceback" not in shown
    assert kernel.reply(after)["status"] == "aborted"
    _, traceback = kernel.run("%tb")
    assert "_boom" in traceback and "boom in the loss" in traceback  # %tb reaches the real cause
    _, last = kernel.run("import sys; print(type(sys.last_value).__name__, sys.last_traceback.tb_frame.f_code.co_name)")
    assert last.split()[0] == "RuntimeError"  # what %debug opens


def test_the_interrupt_keeps_the_stopped_run_and_stops_the_queued_cells(kernel):
    one = kernel.submit(cell("one", steps=3000))
    queued = [kernel.submit("print('after one')"), kernel.submit(cell("two", steps=2)),
              kernel.submit("print('after two')")]
    assert kernel.drain(one, until="STEP 2")
    kernel.manager.interrupt_kernel()

    reply = kernel.reply(one)
    assert reply["status"] == "error" and reply["ename"] == "RunInterrupted"
    assert "run 'one' stopped at step" in kernel.text(one) and "Traceback" not in kernel.text(one)
    assert [kernel.reply(msg_id)["status"] for msg_id in queued] == ["aborted"] * 3
    _, text = kernel.run("r = nbtune.runs['one']; print(r.status, len(r.history) < 3000, r.model is not None, "
                         "'two' in nbtune.runs)")
    assert text.split() == ["stopped", "True", "True", "False"]


def test_run_all_in_nbclient_stops_at_a_failed_finetune_cell(tiny_model_dir, tmp_path):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    cells = [SETUP.format(model=str(tiny_model_dir)), cell("first"), cell("first").replace("steps: 2", "stpes: 2"),
             "print('must not run')"]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    client = NotebookClient(notebook, timeout=TIMEOUT, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(Path(tmp_path))}})

    with pytest.raises(CellExecutionError, match="stpes"):
        client.execute()
    assert notebook.cells[2].outputs and notebook.cells[3].execution_count is None


def test_a_background_runs_progress_stays_in_its_own_cell(kernel):
    started = kernel.submit(cell("bg", steps=30).replace("--no-panel", "--background --no-panel"))
    assert kernel.reply(started)["status"] == "ok"
    later = kernel.submit("nbtune.runs['bg'].wait(120); print('waited')")
    assert kernel.reply(later)["status"] == "ok"
    shown = [m for m in kernel.outputs[started] if m["msg_type"] == "display_data"]
    line_id = next(m["content"]["transient"]["display_id"] for m in shown
                   if "waiting for the first step" in m["content"]["data"]["text/plain"])
    updates = [m["content"] for m in kernel.outputs[later] if m["msg_type"] == "update_display_data"
               and m["content"]["transient"]["display_id"] == line_id]  # the line in the first cell, by its id
    assert updates and "finished" in updates[-1]["data"]["text/plain"]
    # nothing of the run's progress is drawn as the later cell's own output
    own = [m for m in kernel.outputs[later] if m["msg_type"] in ("stream", "display_data")]
    assert [m["content"].get("text", "") for m in own] == ["waited\n"], own


def test_an_interrupt_before_the_first_step_says_nothing_was_kept_and_keeps_nothing(kernel):
    """Issue 29 item 6: the ■ in the first step used to promise a resumable run that was not there (and save
    a `stopped 0/N` run that nbtune.history() listed)."""
    reply, _ = kernel.run(cell("early", steps=2).replace("save: false", "save: true"))
    assert reply["status"] == "ok"
    kernel.run("from nbtune.engine.training import loss\nimport time\n_real = loss.AnswerOnlyLossTrainer.compute_loss\n"
               "def _slow(self, *args, **kwargs):\n    print('IN STEP', flush=True)\n    time.sleep(60)\n"
               "    return _real(self, *args, **kwargs)\nloss.AnswerOnlyLossTrainer.compute_loss = _slow")
    again = kernel.submit(cell("early", steps=5, lr=0.5).replace("save: false", "save: true"))
    assert kernel.drain(again, until="IN STEP")
    kernel.manager.interrupt_kernel()

    reply = kernel.reply(again)
    shown = kernel.text(again)
    assert reply["status"] == "error" and reply["ename"] == "RunInterrupted"
    assert "run 'early' was interrupted before its first step: nothing trained, and nothing of it was kept" in shown
    assert "keeps its adapter" not in shown and "resume" not in shown and "Traceback" not in shown
    kernel.run("loss.AnswerOnlyLossTrainer.compute_loss = _real")
    _, text = kernel.run("r = nbtune.runs['early']; h = nbtune.history()\n"
                         "print(r.status, r.config.steps, [(x.name, x.row()['steps']) for x in h])")
    assert text.split("\n")[0] == "finished 2 [('early', '2/2')]"  # the earlier run, in the kernel and on disk


def test_a_second_cell_of_the_same_name_with_another_method_says_it_replaced_the_first(kernel):
    """Issue 29 item 10: the earlier run's folder was overwritten without a line."""
    saved = cell("dup", steps=2).replace("save: false", "save: true")
    assert kernel.run(saved)[0]["status"] == "ok"
    reply, text = kernel.run(saved)  # the same cell again: its own result, replaced without a word
    assert reply["status"] == "ok" and "replaced" not in text
    reply, text = kernel.run(saved.replace("method: lora\nr: 4\n", "method: ia3\n"))
    assert reply["status"] == "ok"
    assert ("run 'dup' (ia3) replaced the run saved earlier in 'runs/dup' (method lora, finished at step 2, saved "
            in text), text
    assert "nbtune.history() no longer lists that one" in text


def test_a_run_on_a_merged_base_comes_back_on_it_in_a_new_kernel(kernel, tiny_model_dir, tmp_path):
    """Issue 29 item 1: SFT, then DPO on `sft.merge()` as notebook 09 does; a new kernel's load_run used to put
    the adapter on the raw model without a word."""
    from jupyter_client.manager import start_new_kernel

    probe = ("import torch\nids = r.tokenizer(['Convert this date: 4 July 1976'], return_tensors='pt')\n"
             "with torch.no_grad(): print('LOGITS', round(float(r.model(**ids).logits.double().sum()), 3))")
    kernel.run(cell("p_sft", steps=2).replace("save: false", "save: true"))
    reply, text = kernel.run(
        "from nbtune.data.demo import demo_pair_splits\nsft = nbtune.runs['p_sft']\n"
        "r = nbtune.finetune(name='p_dpo', objective='dpo', data=demo_pair_splits()[0][:8], steps=2, batch_size=4, "
        "metric='none', base=(sft.merge(), sft.tokenizer))\n" + probe)
    assert reply["status"] == "ok", text
    trained = next(line for line in text.splitlines() if line.startswith("LOGITS"))

    manager, client = start_new_kernel(kernel_name="python3", cwd=str(tmp_path))
    fresh = Kernel(manager, client)
    try:
        reply, text = fresh.run(SETUP.format(model=str(tiny_model_dir)) + "r = nbtune.load_run('runs/p_dpo')\n"
                                "print('BASE', r.base_name)\n" + probe)
        assert reply["status"] == "ok", text
        assert "BASE p_sft (merged)" in text and trained in text
        fresh.run("import shutil; shutil.rmtree('runs/p_sft'); nbtune.runs.clear()")
        reply, text = fresh.run("nbtune.load_run('runs/p_dpo')")
        assert reply["status"] == "error" and "Traceback" not in text
        assert "which nbtune cannot rebuild; pass that model as its base: nbtune.load_run('runs/p_dpo', base=" in text
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
