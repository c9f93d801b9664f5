"""Comparing runs on one shared base: the table, config diff, curves, side-by-side answers, the memory
ledger, and reclaim really giving memory back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import logits_of, memory_in_use_mb, training_device

import nbtune
from nbtune.engine.evaluation.generation import generate_texts
from nbtune.engine.workbench import Workbench

SETTINGS = {"steps": 3, "batch_size": 4, "metric": "none", "save": False}
PROMPTS = ["Convert this date to ISO format (YYYY-MM-DD): 9 Nov 1989", "hello"]


@pytest.fixture
def bench(monkeypatch):
    fresh = Workbench()
    monkeypatch.setattr("nbtune.engine.workbench.WORKBENCH", fresh)
    return fresh


@pytest.fixture
def three_runs(bench, tiny_model_dir, demo_rows):
    common = {**SETTINGS, "model": str(tiny_model_dir), "data": demo_rows}
    bench.finetune({**common, "name": "lora8", "method": "lora", "r": 8, "lr": 1e-2})
    bench.finetune({**common, "name": "ia3", "method": "ia3"})
    bench.finetune({**common, "name": "prefix", "method": "prefix", "num_virtual_tokens": 4})
    return bench


def test_the_table_shows_each_runs_own_metrics(three_runs):
    view = nbtune.compare("lora8", "ia3", "prefix")
    rows = {row["run"]: row for row in view.table()}
    for name, run in three_runs.runs.items():
        assert rows[name]["method"] == run.method.name
        for key in ("trainable_params", "train_loss", "tokens_per_second", "peak_rss_mb"):
            assert rows[name][key] == run.metrics[key]
    assert list(view.df.index) == ["lora8", "ia3", "prefix"]


def test_the_config_diff_lists_only_keys_that_differ(three_runs):
    diff = nbtune.compare("lora8", "ia3").config_diff()
    assert diff["method"] == {"lora8": "lora", "ia3": "ia3"}
    assert diff["r"] == {"lora8": 8, "ia3": "-"}
    assert "steps" not in diff and "batch_size" not in diff and "name" not in diff


def test_curves_and_html_survive_without_a_kernel(three_runs):
    view = nbtune.compare()  # every run in the kernel
    curves = view.curves()
    assert set(curves) == {"lora8", "ia3", "prefix"} and all(len(c["loss"]) == 3 for c in curves.values())
    page = view._repr_html_()
    assert page.count("<svg") == 2 and page.count("<polyline") == 6 and "<script" not in page


def test_generations_match_each_adapter_alone_and_the_base(three_runs, tiny_model_dir):
    from nbtune.engine.bases.loading import load_base

    rows = nbtune.compare("lora8", "ia3", "prefix").generations(PROMPTS, max_new_tokens=4)
    for name, run in three_runs.runs.items():
        alone = generate_texts(run.model, run.tokenizer, PROMPTS, max_new_tokens=4)
        assert [row[name] for row in rows] == alone
    base = load_base(str(tiny_model_dir), dtype=run.config.dtype)  # the base the runs trained on
    assert [row["base"] for row in rows] == generate_texts(base.model, base.tokenizer, PROMPTS, max_new_tokens=4)


def test_unknown_names_are_refused_with_the_known_ones(three_runs):
    with pytest.raises(nbtune.NbtuneError, match="lora8"):
        nbtune.compare("nope")


def test_the_ledger_tells_shared_adapters_from_own_copies(bench, tiny_model_dir, demo_rows):
    common = {**SETTINGS, "model": str(tiny_model_dir), "data": demo_rows}
    bench.finetune({**common, "name": "adapter", "method": "lora"})
    bench.finetune({**common, "name": "copy", "method": "full"})
    kinds = {row["holder"]: row for row in nbtune.ledger()}
    assert kinds["adapter"]["kind"] == "adapter on the shared base"
    assert kinds["copy"]["kind"] == "own copy of the weights"
    base_row = next(row for row in kinds.values() if row["kind"] == "cached base")
    assert kinds["copy"]["mb"] >= base_row["mb"] > kinds["adapter"]["mb"] > 0


def test_reclaim_gives_the_memory_back(bench, tmp_path, chat_tokenizer, demo_rows):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(chat_tokenizer), hidden_size=512, intermediate_size=1536,
                         num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                         pad_token_id=chat_tokenizer.pad_token_id, eos_token_id=chat_tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "medium")  # ~100 MB of fp32 weights
    chat_tokenizer.save_pretrained(tmp_path / "medium")
    common = {**SETTINGS, "model": str(tmp_path / "medium"), "data": demo_rows, "steps": 1}
    bench.finetune({**common, "name": "a", "method": "lora"})
    bench.finetune({**common, "name": "b", "method": "full"})
    before = memory_in_use_mb()
    report = nbtune.reclaim("all")
    assert before - memory_in_use_mb() > 100, report  # RSS on a CPU, CUDA memory on a GPU
    assert report["freed_mb"] > 100 or training_device().type != "cpu", report
    assert all(run.model is None for run in bench.runs.values()) and not bench.bases
    assert bench.runs["a"].history  # the record of the run stays


@pytest.fixture
def two_loras(bench, tiny_model_dir, demo_rows):
    common = {**SETTINGS, "model": str(tiny_model_dir), "data": demo_rows, "lr": 1e-2}
    bench.finetune({**common, "name": "r4", "r": 4})
    bench.finetune({**common, "name": "r8", "r": 8, "seed": 3})
    bench.finetune({**common, "name": "ia3", "method": "ia3"})
    return bench


def test_lora_runs_answer_in_one_mixed_batch_equal_to_each_alone(two_loras, tiny_model_dir, monkeypatch):
    import nbtune.engine.evaluation.adapters as adapters
    from nbtune.engine.bases.loading import load_base

    calls = []
    original = adapters.mixed_generate
    monkeypatch.setattr(adapters, "mixed_generate", lambda *a, **k: calls.append(a[3]) or original(*a, **k))
    rows = nbtune.compare("r4", "r8", "ia3").generations(PROMPTS, max_new_tokens=4)
    assert calls == [["r4", "r8"]]  # both LoRA runs in one batch; ia3 by switching
    for name, run in two_loras.runs.items():
        assert [row[name] for row in rows] == generate_texts(run.model, run.tokenizer, PROMPTS, max_new_tokens=4)
    base = load_base(str(tiny_model_dir), dtype=run.config.dtype)  # the base the runs trained on
    assert [row["base"] for row in rows] == generate_texts(base.model, base.tokenizer, PROMPTS, max_new_tokens=4)


def test_combined_adapters_are_a_comparable_run(two_loras):
    combined = nbtune.combine(["r4", "r8"], [0.5, 0.5], name="half")
    assert nbtune.runs["half"] is combined and combined.status == "combined"
    assert isinstance(combined.generate("hello", max_new_tokens=3), str)
    nothing = nbtune.combine(["r4", "r8"], [0.0, 0.0], name="nothing")  # zero weights: the base exactly
    r8 = two_loras.runs["r8"]
    ids = r8.tokenizer("hello there", return_tensors="pt")
    with r8.base_disabled():
        assert torch.equal(logits_of(nothing.model, ids), logits_of(r8.model, ids))
        assert not torch.equal(logits_of(combined.model, ids), logits_of(r8.model, ids))
    with pytest.raises(nbtune.NbtuneError, match="one weight per run"):
        nbtune.combine(["r4", "r8"], [1.0])


def test_a_combined_run_saves_into_its_own_folder_and_loads_back(two_loras, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r4 = two_loras.runs["r4"]
    r4_saved = r4.save()
    combined = nbtune.combine(["r4", "r8"], [0.5, 0.5])
    assert combined.name == "r4-r8-combined" and r4.name == "r4" and r4.config.name == "r4"
    assert not combined.model.training and not r4.model.training  # dropout off: the same answer twice
    path = combined.save()
    assert path == Path("runs") / "r4-r8-combined" and (path / "adapter_config.json").is_file()
    assert (r4_saved / "adapter_model.safetensors").is_file()  # the source run's adapter is untouched
    assert json.loads((r4_saved / "run.json").read_text())["name"] == "r4"
    ids = r4.tokenizer("hello there", return_tensors="pt")
    expected = logits_of(combined.model, ids)
    got = logits_of(nbtune.load_run(path).model, ids)
    assert torch.allclose(got, expected, atol=1e-6)
    with pytest.raises(nbtune.NbtuneError, match="not a run name"):
        nbtune.combine(["r4", "r8"], [0.5, 0.5], name="a/b")


def test_save_then_load_run_gives_identical_generations(two_loras, tmp_path):
    run = two_loras.runs["r4"]
    path = run.save(tmp_path / "r4")
    before = run.generate(PROMPTS, max_new_tokens=4)
    nbtune.reclaim("all")
    loaded = nbtune.load_run(path)
    assert nbtune.runs["r4"] is loaded and loaded.generate(PROMPTS, max_new_tokens=4) == before


def test_yaml_and_script_export_rerun_the_same_experiment(two_loras, tmp_path):
    run = two_loras.runs["r8"]
    config = nbtune.RunConfig.parse(run.to_yaml())
    assert config.options["r"] == 8 and config.seed == 3 and config.steps == 3
    script = run.export_script(tmp_path / "again.sh")
    assert "nbtune run r8.yaml" in script and (tmp_path / "again.sh").read_text() == script


def test_an_exported_script_carries_in_memory_data_and_runs(bench, tiny_model_dir, demo_rows, tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    if shutil.which("nbtune", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}") is None:
        pytest.skip("the script calls the `nbtune` command, which `pip install nbtune` (make) puts on PATH")

    import pandas as pd

    run = bench.finetune({**SETTINGS, "steps": 1, "name": "frame", "model": str(tiny_model_dir),
                          "data": pd.DataFrame(demo_rows[:8]), "eval_data": demo_rows[8:10]})
    script = run.export_script(tmp_path / "again.sh")
    assert "data: frame.data.jsonl" in script and "eval_data: frame.eval_data.jsonl" in script
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "again.sh"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "frame.data.jsonl").read_text().splitlines()]
    assert rows == demo_rows[:8]


def test_merge_and_export_writes_a_plain_model(two_loras, tmp_path):
    from transformers import AutoModelForCausalLM

    from nbtune.engine.bases.loading import load_base

    run = two_loras.runs["r4"]
    path = run.merge_and_export(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(path)
    assert plain.dtype == torch.float32  # merged into the fp32 base even when the run trained on a bf16 copy
    on_fp32 = nbtune.load(run.save(tmp_path / "adapter"), base=load_base(run.config.model, dtype="float32"))
    ids = run.tokenizer("hello there", return_tensors="pt")
    on_fp32.model.eval()
    torch.testing.assert_close(logits_of(plain, ids), logits_of(on_fp32.model, ids), atol=1e-5, rtol=1e-5)


def test_merge_and_export_refuses_what_cannot_merge_and_never_replaces_a_saved_run(bench, tiny_model_dir,
                                                                                   demo_rows, tmp_path):
    common = {**SETTINGS, "steps": 1, "model": str(tiny_model_dir), "data": demo_rows}
    houlsby = bench.finetune({**common, "name": "h", "method": "houlsby"})  # bf16 base on this CPU
    with pytest.raises(nbtune.MethodError, match="cannot be merged"):
        houlsby.merge_and_export(tmp_path / "h-merged")
    full = bench.finetune({**common, "name": "f", "method": "full"})
    saved = full.save(tmp_path / "f")
    with pytest.raises(nbtune.NbtuneError, match="exists and is a saved run"):
        full.merge_and_export(saved)
    assert (saved / "run.json").is_file()
    exported = full.merge_and_export(tmp_path / "f-merged")
    assert full.merge_and_export(exported) == exported  # an earlier export is replaced


def test_the_live_view_asks_every_run_and_keeps_a_static_fallback(three_runs):
    view = nbtune.compare("lora8", "ia3")
    bundle = view._repr_mimebundle_()
    assert "<svg" in bundle["text/html"]
    widget = view.widget()
    prompts, ask = widget.children[1].children
    prompts.value = "hello\nConvert this date to ISO format (YYYY-MM-DD): 1 May 2000"
    ask.click()
    answers = widget.children[2].value
    assert answers.count("<tr>") == 3 and "lora8" in answers and "base" in answers


def test_a_reclaimed_run_says_how_to_get_its_model_back(two_loras, tmp_path):
    saved = two_loras.runs["r4"].save(tmp_path / "r4")
    nbtune.reclaim("all")
    with pytest.raises(nbtune.NbtuneError, match=rf"load it back with nbtune.load_run\('{saved}'\)"):
        two_loras.runs["r4"].generate("hi")
    with pytest.raises(nbtune.NbtuneError, match=r"no longer holds its model.* re-run its cell"):
        two_loras.runs["r8"].generate("hi")


def test_loading_what_is_not_a_saved_run_says_so_in_one_line(two_loras, tmp_path, tiny_model_dir, chat_tokenizer):
    from conftest import tiny_llama
    from transformers import LlamaConfig, LlamaForCausalLM

    (tmp_path / "afile").write_text("x")
    (tmp_path / "list-json").mkdir()
    (tmp_path / "list-json" / "run.json").write_text("[1, 2]")
    only_json = tmp_path / "only-json"
    only_json.mkdir()
    (only_json / "run.json").write_text((two_loras.runs["r4"].save(tmp_path / "r4") / "run.json").read_text())
    for path, message in ((tmp_path / "afile", "is not a folder"), (tmp_path / "list-json", "not one Run.save"),
                          (only_json, "no usable tokenizer")):
        with pytest.raises(nbtune.NbtuneError, match=message):
            nbtune.load(path, base=(tiny_llama(chat_tokenizer), chat_tokenizer))
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=len(chat_tokenizer), hidden_size=128, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(nbtune.NbtuneError, match="trained on another base model"):
        nbtune.load(tmp_path / "r4", base=(wider, chat_tokenizer))


def test_merge_and_export_of_a_run_on_an_in_memory_base(chat_tokenizer, demo_rows, tmp_path):
    from conftest import tiny_llama
    from transformers import AutoModelForCausalLM

    settings = {**SETTINGS, "steps": 1, "data": demo_rows, "model": str(tmp_path / "not-here")}
    fp32 = nbtune.finetune(base=(tiny_llama(chat_tokenizer), chat_tokenizer), **settings)
    merged = AutoModelForCausalLM.from_pretrained(fp32.merge_and_export(tmp_path / "m"))  # no reload needed
    ids = chat_tokenizer("hello there", return_tensors="pt")
    torch.testing.assert_close(logits_of(merged, ids), logits_of(fp32.merge(), ids))
    low = nbtune.finetune(base=(tiny_llama(chat_tokenizer).to(torch.bfloat16), chat_tokenizer), **settings)
    with pytest.raises(nbtune.NbtuneError, match="trained on a base passed in memory"):
        low.merge_and_export(tmp_path / "m2")


def test_the_ledger_shows_the_memory_the_allocator_kept_and_gives_it_back():
    """Issue 29 item 14: freed memory a background thread's arena kept showed in RSS and nowhere else."""
    import threading

    import torch

    from nbtune.engine.compute.memory import rss_mb

    kept_alive: list = []

    def work():  # mid-sized tensors, as training allocates, most freed on this thread: its arena keeps them
        made = [torch.ones(16 * 1024) for _ in range(10000)]  # 64 KiB each: below any mmap threshold
        kept_alive.extend(made[::20])  # a few survive, as a run's results do: the freed pages sit between them

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    before = rss_mb()
    rows = {row["holder"]: row["mb"] for row in nbtune.ledger() if row["kind"] == "process"}
    returned = rows["freed memory the allocator had kept, given back now"]
    assert returned > 400  # 9500 x 64 KiB were freed and kept
    assert rows["resident memory of this kernel (RSS)"] < before - 400
    assert rows["resident memory of this kernel (RSS)"] >= rows["everything else (Python, torch, tokenizers, data)"]
    again = {row["holder"]: row["mb"] for row in nbtune.ledger() if row["kind"] == "process"}
    assert again["freed memory the allocator had kept, given back now"] < 20  # nothing left to give back
