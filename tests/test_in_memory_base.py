"""A run trained on a model passed in memory comes back on that model, or not at all (issue 29, item 1).

SFT, then DPO on `sft.merge()` (as notebook 09 does), both saved: reopened in a fresh kernel the DPO run used
to land silently on the raw base and answer junk. Now its run.json records the in-memory base (the run it was
merged from, with a fingerprint of its weights), `load` / `load_run` / `compare` rebuild it from the folder
of the run it was merged from, and refuse in one line saying how to pass it (`base=`) when they cannot.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import logits_of

import nbtune
import nbtune.engine.workbench as wb
from nbtune.data.demo import demo_pair_splits, demo_splits
from nbtune.errors import NbtuneError, NbtuneWarning

FAST = {"steps": 3, "batch_size": 4, "lr": 5e-3, "metric": "exact_match", "metric_samples": 4, "max_length": 96,
        "eval_split": 0.25, "precision": "fp32"}


@pytest.fixture
def bench(tiny_model_dir, monkeypatch):
    """A workbench of its own whose runs name the tiny model on disk as `model` (so their base is cached)."""
    fresh = wb.Workbench()
    monkeypatch.setattr(wb, "WORKBENCH", fresh)
    return fresh


def data_files() -> tuple[str, str]:
    """The rows as files: a reopened run reads its eval rows again from them (in-memory data is not saved)."""
    for name, rows in (("rows.jsonl", demo_splits()[0][:24]), ("pairs.jsonl", demo_pair_splits()[0][:24])):
        Path(name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return "rows.jsonl", "pairs.jsonl"


def sft_then_dpo(model: Path) -> tuple[nbtune.Run, nbtune.Run]:
    rows, pairs = data_files()
    sft = nbtune.finetune(name="p_sft", model=str(model), data=rows, **FAST)
    dpo = nbtune.finetune(name="p_dpo", model=str(model), data=pairs, objective="dpo",
                          base=(sft.merge(), sft.tokenizer), **{**FAST, "lr": 1e-2})
    return sft, dpo


def a_new_kernel(monkeypatch) -> wb.Workbench:
    """What a new kernel has: no runs, no cached base, no cached base answers."""
    from nbtune.engine.evaluation import scoring as evaluation

    fresh = wb.Workbench()
    monkeypatch.setattr(wb, "WORKBENCH", fresh)
    monkeypatch.setattr(evaluation, "_BASE_ANSWERS", type(evaluation._BASE_ANSWERS)())
    return fresh


def inputs(tokenizer) -> dict[str, torch.Tensor]:
    return tokenizer(["Convert this date to ISO format (YYYY-MM-DD): 4 July 1976"], return_tensors="pt")


def test_the_run_json_says_which_model_in_memory_it_trained_on(bench, tiny_model_dir):
    sft, dpo = sft_then_dpo(tiny_model_dir)
    recorded = json.loads((dpo.saved_to / "run.json").read_text())["provenance"]["model"]
    assert recorded["in_memory"] is True and recorded["path"] is None and recorded["name"] == "p_sft (merged)"
    assert recorded["merged_from"] == {"run": "p_sft", "id": sft.id, "method": "lora", "saved_to": "runs/p_sft"}
    assert len(recorded["fingerprint"]) == 64 and dpo.base_name == "p_sft (merged)"
    plain = json.loads((sft.saved_to / "run.json").read_text())["provenance"]["model"]
    assert plain["in_memory"] is False and plain["merged_from"] is None and plain["weights"]


def test_a_run_on_a_merged_base_comes_back_on_that_base_in_a_new_kernel(bench, tiny_model_dir, monkeypatch):
    _, dpo = sft_then_dpo(tiny_model_dir)
    expected = logits_of(dpo.model, inputs(dpo.tokenizer))
    saved_metrics = dict(dpo.metrics)

    a_new_kernel(monkeypatch)
    loaded = nbtune.load_run("runs/p_dpo")
    assert loaded.base_name == "p_sft (merged)" and nbtune.runs["p_dpo"] is loaded
    assert torch.allclose(logits_of(loaded.model, inputs(loaded.tokenizer)), expected, atol=1e-5)
    again = loaded.evaluate()
    assert again["exact_match"] == saved_metrics["exact_match"]
    assert again["base_exact_match"] == saved_metrics["base_exact_match"]  # the base is the SFT model again


def test_nbtune_load_and_compare_rebuild_it_too(bench, tiny_model_dir, monkeypatch):
    _, dpo = sft_then_dpo(tiny_model_dir)
    expected = logits_of(dpo.model, inputs(dpo.tokenizer))
    a_new_kernel(monkeypatch)
    loaded = nbtune.load("runs/p_dpo")
    assert torch.allclose(logits_of(loaded.model, inputs(loaded.tokenizer)), expected, atol=1e-5)
    cmp = nbtune.compare("runs/p_dpo")
    answers = cmp.generations(["Convert this date to ISO format (YYYY-MM-DD): 4 July 1976"])
    assert answers[0]["p_dpo"] == loaded.generate("Convert this date to ISO format (YYYY-MM-DD): 4 July 1976",
                                                  max_new_tokens=32)


def test_without_the_run_it_was_merged_from_it_is_refused_in_one_line(bench, tiny_model_dir, monkeypatch):
    sft_then_dpo(tiny_model_dir)
    shutil.rmtree("runs/p_sft")
    a_new_kernel(monkeypatch)
    with pytest.raises(NbtuneError) as info:
        nbtune.load_run("runs/p_dpo")
    said = str(info.value)
    assert "\n" not in said and info.value.field == "base"
    assert said == ("run 'p_dpo' trained on run 'p_sft' merged (run.merge()), whose saved folder is not where it "
                    "was nor beside this one, which nbtune cannot rebuild; pass that model as its base: "
                    "nbtune.load_run('runs/p_dpo', base=(nbtune.load_run('runs/p_sft').merge(), tokenizer)).")
    assert "p_dpo" not in nbtune.runs
    with pytest.raises(NbtuneError, match="cannot rebuild"):
        nbtune.compare("runs/p_dpo").generations(["hi"])


def test_a_newer_run_saved_over_the_one_it_was_merged_from_is_not_taken_for_it(bench, tiny_model_dir, monkeypatch):
    sft_then_dpo(tiny_model_dir)
    nbtune.finetune(name="p_sft", model=str(tiny_model_dir), data="rows.jsonl", **{**FAST, "lr": 0.1})
    a_new_kernel(monkeypatch)
    with pytest.raises(NbtuneError, match="cannot rebuild"):
        nbtune.load("runs/p_dpo")


def test_the_base_can_be_passed_and_a_different_one_is_warned_about(bench, tiny_model_dir, monkeypatch):
    sft, dpo = sft_then_dpo(tiny_model_dir)
    merged, tokenizer = sft.merge(), sft.tokenizer
    expected = logits_of(dpo.model, inputs(dpo.tokenizer))
    a_new_kernel(monkeypatch)
    loaded = nbtune.load_run("runs/p_dpo", base=(merged, tokenizer))
    assert torch.allclose(logits_of(loaded.model, inputs(loaded.tokenizer)), expected, atol=1e-5)
    from conftest import tiny_llama

    with pytest.warns(NbtuneWarning, match="is not the model it trained on"):
        nbtune.load("runs/p_dpo", base=(tiny_llama(tokenizer, seed=7), tokenizer))


def test_a_model_passed_in_memory_from_elsewhere_is_refused_unless_given(llama_base, demo_rows, monkeypatch):
    run = nbtune.finetune(name="mine", data=demo_rows, base=llama_base, steps=1, batch_size=4, metric="none")
    info = json.loads((run.saved_to / "run.json").read_text())
    assert info["provenance"]["model"]["in_memory"] is True and info["provenance"]["model"]["merged_from"] is None
    a_new_kernel(monkeypatch)
    with pytest.raises(NbtuneError, match=r"trained on .* passed in memory, which nbtune cannot rebuild; pass that "
                                          r"model as its base: nbtune.load_run\('runs/mine', base=\(model, "
                                          r"tokenizer\)\)"):
        nbtune.load("runs/mine")
    # a run.json written before `in_memory` was recorded: told apart by its missing folder all the same
    del info["provenance"]["model"]["in_memory"]
    (run.saved_to / "run.json").write_text(json.dumps(info))
    with pytest.raises(NbtuneError, match="cannot rebuild"):
        nbtune.load_run("runs/mine")


# ---------------------------------------------------------------- item 4: one name, one model
def test_runs_on_different_bases_get_a_base_row_each_named_after_it(bench, tiny_model_dir):
    sft, dpo = sft_then_dpo(tiny_model_dir)
    table = nbtune.compare("p_sft", "p_dpo").table()
    raw, merged = f"base: {tiny_model_dir.name}", "base: p_sft (merged)"
    assert [r["run"] for r in table] == [raw, merged, "p_sft", "p_dpo"]
    assert table[0]["exact_match"] == sft.metrics["base_exact_match"]
    assert table[1]["exact_match"] == dpo.metrics["base_exact_match"]
    rows = nbtune.compare("p_sft", "p_dpo").agreement()
    assert {raw, merged, "p_sft", "p_dpo"} <= set(rows[0]) and "base" not in rows[0]


def test_bootstrap_against_an_ambiguous_base_names_the_choices(bench, tiny_model_dir):
    sft_then_dpo(tiny_model_dir)
    cmp = nbtune.compare("p_sft", "p_dpo")
    raw, merged = f"base: {tiny_model_dir.name}", "base: p_sft (merged)"
    with pytest.raises(NbtuneError) as info:
        cmp.bootstrap("p_dpo", "base", resamples=50)
    assert str(info.value) == (f"'base' means 2 models in this comparison: {raw!r} (of p_sft); {merged!r} (of "
                               f"p_dpo). Name one, e.g. cmp.bootstrap('p_dpo', {merged!r}).")
    own = cmp.bootstrap("p_dpo", merged, resamples=50)
    alone = nbtune.compare("p_dpo").bootstrap("p_dpo", "base", resamples=50)  # one base: 'base' is that one
    assert own["b"] == alone["b"] == merged and own["difference"] == alone["difference"]
    assert own["score_b"] == nbtune.runs["p_dpo"].metrics["base_exact_match"]
    against_raw = cmp.bootstrap("p_dpo", raw, resamples=50)
    assert against_raw["b"] == raw and against_raw["score_b"] == nbtune.runs["p_sft"].metrics["base_exact_match"]


def test_the_comparison_page_shows_both_bases_and_their_agreement_columns(bench, tiny_model_dir):
    sft_then_dpo(tiny_model_dir)
    page = nbtune.compare("p_sft", "p_dpo")._repr_html_()
    for label in (f"base: {tiny_model_dir.name}", "base: p_sft (merged)"):
        assert page.count(label) >= 2, label  # a row of the table, a column of the agreement
