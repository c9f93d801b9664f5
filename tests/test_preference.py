"""Preference tuning (`objective: dpo | orpo | simpo | kto`) on TRL's trainers: config and data refused in one
line before any weight loads, every objective trains on the tiny model, the reference is the base with the
adapter switched off (no second model, no lasting 'ref' adapter), methods that train the base precompute
it, and a preference run is watched, stopped, resumed, compared and saved like any run."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import logits_of

import nbtune
import nbtune.engine.workbench as wb
from nbtune.config import RunConfig
from nbtune.data.demo import demo_pair_splits, demo_splits
from nbtune.errors import ConfigError, DataError
from nbtune.methods import get_method
from nbtune.objectives import dpo, kto, orpo, simpo
from nbtune.objectives.trl_pairs import reference_for

FAST = {"steps": 2, "batch_size": 2, "lr": 5e-3, "metric": "none", "save": False, "max_length": 96}


@pytest.fixture
def pairs():
    return demo_pair_splits()[0][:24]


def train(base, objective="dpo", data=None, **config):
    return nbtune.finetune(data=data if data is not None else demo_pair_splits()[0][:24], base=base,
                           objective=objective, eval_split=0.25, **{**FAST, **config})


# ------------------------------------------------------------------ config, before anything loads
@pytest.mark.parametrize("config, field, match", [
    ({"beta": 0.2}, "beta", "preference-tuning setting"),
    ({"objective": "dpo", "loss_type": "simpo"}, "loss_type", "no dpo loss"),
    ({"objective": "dpo", "loss_type": "ipp"}, "loss_type", "Did you mean `ipo`"),
    ({"objective": "orpo", "loss_type": "sigmoid"}, "loss_type", "has one loss"),
    ({"objective": "simpo", "precompute_ref": True}, "precompute_ref", "has none"),
    ({"objective": "kto", "batch_size": 1}, "batch_size", "2 or more"),
    ({"objective": "dpo", "train_on_prompt": True}, "train_on_prompt", "compares the answers' log-probs"),
    ({"objective": "simpo", "train_on_prompt": True}, "train_on_prompt", "`objective: orpo` takes it"),
    ({"objective": "kto", "train_on_prompt": True}, "train_on_prompt", "does not apply to `objective: kto`"),
    ({"objective": "dpx"}, "objective", "dpo"),
])
def test_a_setting_that_cannot_work_is_one_line_naming_it(config, field, match):
    with pytest.raises(ConfigError, match=match) as info:
        RunConfig.parse(config)
    assert info.value.field == field and "\n" not in str(info.value)


def test_kto_without_its_kl_term_trains_on_batches_of_one():
    assert RunConfig.parse(objective="kto", batch_size=1, loss_type="apo_zero_unpaired").batch_size == 1


def test_orpo_takes_train_on_prompt_for_its_nll_term():
    assert RunConfig.parse(objective="orpo", train_on_prompt=True).train_on_prompt is True


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a weight was loaded")

    monkeypatch.setattr("nbtune.engine.training.pipeline.load_base", refuse)


def bad(rows, **config):
    with pytest.raises(DataError) as info:
        nbtune.finetune(data=rows, objective=config.pop("objective", "dpo"), **{**FAST, **config})
    assert "\n" not in str(info.value)
    assert not wb.WORKBENCH.bases and not nbtune.runs
    return str(info.value)


def test_bad_preference_data_is_one_line_before_any_weight_loads(no_loading, pairs):
    assert "needs columns prompt, chosen, rejected" in bad(demo_splits()[0][:8])
    assert "row 1 of `data` has an empty `rejected`" in bad([pairs[0], {**pairs[1], "rejected": " "}])
    assert "row 0 of `data` has an empty `chosen`" in bad([{**pairs[0], "chosen": None}, pairs[1]])
    assert "same answer as chosen and rejected" in bad([{**pairs[0], "rejected": pairs[0]["chosen"]}, pairs[1]])
    unpaired = [{"prompt": "p", "completion": "c", "label": True}, {"prompt": "q", "completion": "d", "label": "yes"}]
    assert "row 1 of `data` has label 'yes'" in bad(unpaired, objective="kto")
    assert "would learn the undesirable ones too" in bad(unpaired, objective="sft")
    assert "`objective: orpo` learns from preferences" in bad(unpaired, objective="orpo")


def test_the_demo_pairs_are_the_demo_task_with_a_plausible_wrong_answer():
    (train, test), (plain_train, plain_test) = demo_pair_splits(), demo_splits()
    assert [r["chosen"] for r in train] == [r["completion"] for r in plain_train]
    assert [r["prompt"] for r in test] == [r["prompt"] for r in plain_test]
    for row in train + test:
        assert row["rejected"] != row["chosen"] and row["rejected"].strip()
    swapped = [r for r in train if r["rejected"] == f"{r['chosen'][:4]}-{r['chosen'][8:]}-{r['chosen'][5:7]}"]
    assert len(swapped) > 20  # day and month swapped, the base model's favourite mistake


def test_chat_pairs_without_a_prompt_take_their_shared_opening_as_the_prompt(llama_base):
    user = {"role": "user", "content": "2+2?"}
    rows = [{"chosen": [user, {"role": "assistant", "content": str(4 + i)}],
             "rejected": [user, {"role": "assistant", "content": "five"}]} for i in range(8)]
    run = nbtune.finetune(data=rows, base=llama_base, objective="dpo", **FAST)
    assert run.status == "finished"


# ------------------------------------------------------------------ where the reference comes from
@pytest.mark.parametrize("objective, method, options, precompute, peft, expected", [
    ("dpo", "lora", {}, False, True, "adapter_off"),
    ("dpo", "lora", {}, True, True, "precomputed"),
    ("kto", "ia3", {}, False, True, "adapter_off"),
    ("dpo", "lora", {"init": "pissa"}, False, True, "precomputed"),  # PiSSA rewrote the base: off is no base
    ("dpo", "full", {}, False, False, "precomputed"),
    ("dpo", "freeze", {}, False, False, "precomputed"),
    ("orpo", "lora", {}, False, True, "none"),
    ("simpo", "full", {}, False, False, "none"),
])
def test_the_reference_is_the_base_without_a_second_model(objective, method, options, precompute, peft, expected):
    spec = get_method(method)
    options = spec.check_options(options, RunConfig.parse(method=method))
    trl = {"dpo": dpo.TRL, "kto": kto.TRL, "orpo": orpo.TRL, "simpo": simpo.TRL}[objective]  # each one's TrlPairs
    assert reference_for(trl.reference, spec, options, precompute, peft) == expected


# ------------------------------------------------------------------ training
@pytest.mark.parametrize("objective, keys, share", [
    ("dpo", {"reward_margin", "reward_chosen", "reward_rejected"}, "reward_accuracy"),
    ("kto", {"reward_margin", "reward_chosen", "reward_rejected", "kl"}, None),  # no pairs to be right about
    ("orpo", {"logp_margin", "logp_chosen", "logp_rejected", "nll_loss", "log_odds_ratio"}, "chosen_preferred"),
    ("simpo", {"logp_margin", "logp_chosen", "logp_rejected"}, "chosen_preferred"),
])
def test_every_objective_trains_and_reports_its_own_curves(llama_base, objective, keys, share):
    run = train(llama_base, objective)
    assert run.status == "finished" and len(run.history) == 2
    assert all(math.isfinite(r["loss"]) for r in run.history)
    assert keys <= set(run.history[-1]), run.history[-1]
    margin = "reward_margin" if "reward_margin" in keys else "logp_margin"
    assert math.isfinite(run.metrics["eval_loss"]) and math.isfinite(run.metrics[margin])
    if share is not None:
        assert 0.0 <= run.metrics[share] <= 1.0


def test_dpo_against_the_base_leaves_no_second_adapter_and_no_patched_forward(llama_base):
    run = train(llama_base, "dpo")
    assert list(run.model.peft_config) == ["default"]
    assert "forward" not in run.model.get_base_model().__dict__
    assert "reference_seconds" not in run.metrics  # nothing precomputed: the base is the adapter switched off


def test_the_reference_forward_is_the_base_model(llama_base, monkeypatch):
    """The log-probs DPO takes as the reference are the cached base's own, to the last bit."""
    from trl.trainer import dpo_trainer

    seen = []
    real = dpo_trainer.use_adapter

    def watching(model, adapter_name=None):
        seen.append(adapter_name)
        return real(model, adapter_name=adapter_name)

    monkeypatch.setattr(dpo_trainer, "use_adapter", watching)
    run = train(llama_base, "dpo")
    assert run.status == "finished" and seen and set(seen) == {None}  # None: peft's disable_adapter


def test_a_method_that_trains_the_base_precomputes_the_reference_once(llama_base):
    run = train(llama_base, "dpo", method="full", lr=1e-4)
    assert run.status == "finished" and run.metrics["reference_seconds"] >= 0
    assert math.isfinite(run.metrics["reward_margin"])


def test_sft_then_dpo_on_one_cached_base_and_compare_puts_them_side_by_side(tiny_model_dir, pairs, monkeypatch):
    from nbtune.engine.training import pipeline

    loads = []
    real = pipeline.load_base
    monkeypatch.setattr(pipeline, "load_base", lambda *a, **k: loads.append(a) or real(*a, **k))
    common = {"model": str(tiny_model_dir), "data": pairs, "eval_split": 0.25, **FAST}
    sft = nbtune.finetune(name="sft", **common)
    dpo = nbtune.finetune(name="dpo", objective="dpo", **common)
    assert len(wb.WORKBENCH.bases) == 1 and len(loads) <= 1
    table = nbtune.compare(sft, dpo).df
    assert list(table.index) == ["sft", "dpo"]
    assert math.isnan(table.loc["sft", "reward_margin"]) and table.loc["dpo", "reward_margin"] == dpo.metrics[
        "reward_margin"]
    assert dpo.config.objective == "dpo" and sft.config.objective == "sft"


def test_a_stopped_dpo_run_resumes_to_its_planned_steps(llama_base):
    class StopAtOne:
        def on_step(self, run, record):
            if record["step"] == 1:
                run.stop()

    run = nbtune.finetune(data=demo_pair_splits()[0][:24], base=llama_base, objective="dpo", eval_split=0.25,
                          observers=[StopAtOne()], **{**FAST, "steps": 3})
    assert run.status == "stopped" and len(run.history) == 1
    run.resume()
    assert run.status == "finished" and [r["step"] for r in run.history] == [1, 2, 3]
    assert list(run.model.peft_config) == ["default"]


def test_a_resumed_full_run_keeps_the_reference_it_computed_before_its_first_step(llama_base, monkeypatch):
    from trl.trainer.dpo_trainer import DPOTrainer

    computed = []
    real = DPOTrainer._precompute_ref_logps

    def counting(self, dataset, name, batch_size):
        computed.append(name)
        return real(self, dataset, name, batch_size)

    monkeypatch.setattr(DPOTrainer, "_precompute_ref_logps", counting)

    class StopAtOne:
        def on_step(self, run, record):
            if record["step"] == 1:
                run.stop()

    run = nbtune.finetune(data=demo_pair_splits()[0][:24], base=llama_base, objective="dpo", method="full",
                          eval_split=0.25, observers=[StopAtOne()], **{**FAST, "steps": 3, "lr": 1e-4})
    assert run.status == "stopped" and computed == ["train", "eval"]
    run.resume()
    assert run.status == "finished" and computed == ["train", "eval"]


def test_a_saved_dpo_adapter_loads_back_with_the_same_outputs(llama_base, tmp_path):
    run = train(llama_base, "dpo", save=True, output_dir=str(tmp_path / "dpo"))
    again = nbtune.load(tmp_path / "dpo", base=llama_base)
    ids = {"input_ids": torch.tensor([[1, 5, 9, 12]])}
    assert torch.equal(logits_of(run.model, ids), logits_of(again.model, ids))  # on whatever device they are
    assert again.config.objective == "dpo" and again.metrics["reward_margin"] == run.metrics["reward_margin"]


def test_sft_on_pairs_learns_the_chosen_answers(llama_base, pairs):
    run = nbtune.finetune(data=pairs, base=llama_base, eval_split=0.25, **FAST)
    chosen, rejected = {row["chosen"] for row in pairs}, {row["rejected"] for row in pairs}
    assert run.status == "finished" and len(run.eval_pairs) == 6
    assert all(answer in chosen and answer not in rejected for _, answer in run.eval_pairs)


def test_the_preview_shows_each_pair_as_the_trainer_builds_it(llama_base):
    from nbtune.data.preview import preview_batch

    pairs = demo_pair_splits()[0][:3]
    preview = preview_batch(RunConfig.parse(data=pairs, objective="dpo"), llama_base[1], n=2)
    sides = [(ex.position, ex.side) for ex in preview.examples]
    assert sides == [(0, "chosen"), (0, "rejected"), (1, "chosen"), (1, "rejected")]
    for ex, answer in zip(preview.examples, [pairs[0]["chosen"], pairs[0]["rejected"]], strict=False):
        scored = "".join(p for p, loss in zip(ex.pieces, ex.loss, strict=True) if loss)
        assert scored.startswith(answer) and not any(ex.loss[: ex.length - ex.loss_tokens])  # answers only
    assert "first 2 preference pairs" in str(preview) and "(rejected)" in str(preview)


def test_the_demo_pairs_bring_their_own_held_out_pairs(llama_base):
    from nbtune.data.splits import read_data

    train, evaluation, fmt = read_data(RunConfig.parse(data="demo_pairs", objective="dpo"))
    assert fmt == "preference" and (len(train), len(evaluation)) == (512, 64)
    assert set(evaluation.column_names) == {"prompt", "chosen", "rejected"}
