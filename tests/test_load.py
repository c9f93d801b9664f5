"""Memory is given back and a kernel stays healthy under load (issue 8, items 8 and 9)."""

from __future__ import annotations

import threading

import psutil
import pytest
import torch
from conftest import memory_in_use_mb, nbtune_shell

import nbtune

SETTINGS = {"steps": 2, "batch_size": 4, "metric": "none", "save": False, "precision": "fp32", "seed": 1}


@pytest.fixture(scope="module")
def medium_model(tmp_path_factory, _chat_tokenizer):
    """A ~100 MB Llama on disk: big enough that a leaked copy shows in RSS, small enough to train fast."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("medium")
    config = LlamaConfig(vocab_size=len(_chat_tokenizer), hidden_size=512, intermediate_size=1536,
                         num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                         pad_token_id=_chat_tokenizer.pad_token_id, eos_token_id=_chat_tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    _chat_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def shell(medium_model, demo_rows):
    with nbtune_shell(medium_model, rows=demo_rows[:16]) as ip:
        yield ip


def settled_rss() -> float:
    """What the device policy counts: this process's RSS on a CPU, CUDA memory on a GPU."""
    return memory_in_use_mb()


def cell(method: str, extra: str = "") -> str:
    lines = [f"method: {method}", "data: {{ rows }}", *(f"{k}: {str(v).lower()}" for k, v in SETTINGS.items())]
    return "\n".join(lines) + "\n" + extra


class StopAtOne:
    def on_step(self, run, record):
        run.stop()


def test_twenty_runs_back_to_back_leave_the_kernel_healthy(shell, capsys, medium_model):
    import nbtune.engine.workbench as wb

    shell.run_cell_magic("finetune", "warm-up --no-panel", cell("lora"))  # imports, kernels, the cached base
    nbtune.reclaim("all")
    baseline, threads, files = settled_rss(), threading.active_count(), len(psutil.Process().open_files())
    methods = ["lora", "ia3", "full", "prefix", "houlsby"]
    expected = {}
    for i in range(20):
        name, method = f"load-{i}", methods[i % len(methods)]
        if i % 5 == 3:  # fails after the base is loaded: a target module the model lacks
            result = shell.run_cell(f"%%finetune {name} --no-panel\n" + cell("lora", "target_modules: [nope_proj]"))
            assert not result.success and "nope_proj" in capsys.readouterr().err
            del result  # its error's traceback holds the failed run's model, as a notebook's last error does
            continue  # nothing trained: the run is not kept
        if i % 5 == 4:  # interrupted by Stop after its first step
            run = wb.WORKBENCH.finetune({**SETTINGS, "name": name, "method": method, "data": "demo",
                                         "model": str(medium_model)}, observers=[StopAtOne()])
            assert run.status == "stopped"
            expected[name] = "stopped"
            continue
        run = shell.run_cell_magic("finetune", f"{name} --no-panel", cell(method))
        assert run.status == "finished", run.error
        expected[name] = "finished"
    assert {n: r.status for n, r in wb.WORKBENCH.runs.items() if n.startswith("load-")} == expected
    report = nbtune.reclaim("all")
    after = settled_rss()
    print(f"20 runs: RSS baseline {baseline:.0f} MB, before reclaim {report['rss_before_mb']:.0f} MB, "
          f"after {after:.0f} MB")  # for the record (pytest -s)
    assert after <= baseline * 1.10 + 10, (baseline, after, report)  # +10 MB: CUDA's baseline is near 0
    assert threading.active_count() <= threads, threading.enumerate()
    assert len(psutil.Process().open_files()) <= files


def test_a_failed_cells_traceback_does_not_pin_the_model(shell, medium_model, monkeypatch):
    from nbtune.engine.training.callbacks import RunCallback

    shell.run_cell_magic("finetune", "warm-up --no-panel", cell("full"))
    nbtune.reclaim("all")
    baseline = settled_rss()
    original = RunCallback.on_step_end

    def crash(self, args, state, control, **kwargs):
        original(self, args, state, control, **kwargs)
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(RunCallback, "on_step_end", crash)
    # A plain API call in a cell: the exception reaches IPython, which keeps its traceback (whose frames
    # hold the model: a full fine-tune's own copy, ~100 MB).
    result = shell.run_cell(f"import nbtune\nnbtune.finetune(model={str(medium_model)!r}, method='full', "
                            "data='demo', steps=3, batch_size=4, metric='none', save=False)")
    assert isinstance(result.error_in_exec, RuntimeError)
    del result
    assert settled_rss() > baseline + 80  # pinned
    report = nbtune.reclaim("all")
    after = settled_rss()
    print(f"failed cell: RSS baseline {baseline:.0f} MB, before reclaim {report['rss_before_mb']:.0f} MB, "
          f"after {after:.0f} MB")
    assert after <= baseline * 1.10 + 10
