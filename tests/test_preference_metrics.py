"""What a preference run reports, named for what it is: DPO's and KTO's rewards are relative to the reference
(`reward_accuracy`, `reward_margin`), ORPO's and SimPO's are the model's own average log-probs
(`chosen_preferred`, `logp_margin`), in history records, `run.metrics`, the panel's chart and compare's
columns (each as its objective's spec declares it); and ORPO and SimPO count their tokens, so their tokens/s is
filled like every other run's."""

from __future__ import annotations

import math

import pytest

import nbtune
from nbtune.data.demo import demo_pair_splits
from nbtune.engine.training.callbacks import _records_from_log
from nbtune.objectives import all_objectives, get_objective, report_columns
from nbtune.widgets.render import rewards_chart

FAST = {"steps": 2, "batch_size": 2, "lr": 5e-3, "metric": "none", "save": False, "max_length": 96}
RELATIVE = {"reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected"}
ABSOLUTE = {"chosen_preferred", "logp_margin", "logp_chosen", "logp_rejected"}
# compare's preference columns, in its order: the union of every objective's declared columns
COMPARE_COLUMNS = report_columns(spec.name for spec in all_objectives())


def train(base, objective, **config):
    return nbtune.finetune(data=demo_pair_splits()[0][:24], base=base, objective=objective, eval_split=0.25,
                           **{**FAST, **config})


@pytest.mark.parametrize("objective, shown", [
    ("dpo", ["reward_accuracy", "reward_margin"]),
    ("kto", ["reward_margin"]),
    ("orpo", ["chosen_preferred", "logp_margin"]),
    ("simpo", ["chosen_preferred", "logp_margin"]),
])
def test_relative_and_absolute_preferences_have_names_of_their_own(llama_base, objective, shown):
    run = train(llama_base, objective)
    has, lacks = (RELATIVE, ABSOLUTE) if objective in ("dpo", "kto") else (ABSOLUTE, RELATIVE)
    for record in (run.history[-1], run.metrics):
        assert not lacks & set(record), record
    assert has - {"reward_accuracy"} <= set(run.history[-1])
    assert [key for key in COMPARE_COLUMNS if key in run.metrics] == shown
    if objective in ("orpo", "simpo"):  # the margin of the model's own average log-probs per token, unscaled
        last = run.eval_history[-1]
        assert run.metrics["logp_margin"] == round(last["eval_logps/chosen"] - last["eval_logps/rejected"], 4)
        beta = run.config.objective_options["beta"]
        assert beta == {"orpo": 0.1, "simpo": 2.0}[objective]  # each objective's own default
        assert last["eval_rewards/margins"] == pytest.approx(beta * (last["eval_logps/chosen"]
                                                                     - last["eval_logps/rejected"]), rel=1e-4)
    assert all(get_objective(objective).curve(key).meaning for key in get_objective(objective).columns)


@pytest.mark.parametrize("objective, says, not_says", [
    ("dpo", ["reward accuracy", "reward margin (chosen - rejected)"], ["chosen preferred"]),
    ("orpo", ["chosen preferred", "log-prob margin (chosen - rejected)"], ["reward accuracy", "reward margin"]),
])
def test_the_panel_chart_names_what_it_draws(llama_base, objective, says, not_says):
    chart = rewards_chart(train(llama_base, objective, eval_steps=1))
    assert chart.count('fill="#e6550d"') == 3  # evaluation points: steps 1 and 2, and the final one
    for words in says:
        assert words in chart
    for words in not_says:
        assert words not in chart


def test_compare_shows_each_objectives_columns_side_by_side(tiny_model_dir):
    """compare.py shows the columns the compared runs' objectives declare (`ObjectiveSpec.columns`)."""
    common = {"model": str(tiny_model_dir), "data": demo_pair_splits()[0][:24], "eval_split": 0.25, **FAST}
    dpo = nbtune.finetune(name="dpo", objective="dpo", **common)
    orpo = nbtune.finetune(name="orpo", objective="orpo", **common)
    table = nbtune.compare(dpo, orpo).df
    assert table.loc["dpo", "reward_accuracy"] == dpo.metrics["reward_accuracy"]
    assert table.loc["orpo", "chosen_preferred"] == orpo.metrics["chosen_preferred"]
    assert math.isnan(table.loc["orpo", "reward_accuracy"]) and math.isnan(table.loc["dpo", "chosen_preferred"])


def test_a_resumed_runs_history_rebuilt_from_its_checkpoint_keeps_the_objectives_names():
    log = [{"step": 1, "loss": 1.0, "rewards/accuracies": 1.0, "rewards/margins": 0.2, "logps/chosen": -1.5,
            "logps/rejected": -3.5, "nll_loss": 1.4}]
    orpo, dpo = _records_from_log(log, "orpo")[0], _records_from_log(log, "dpo")[0]
    assert (orpo["chosen_preferred"], orpo["logp_margin"], orpo["nll_loss"]) == (1.0, 2.0, 1.4)
    assert (dpo["reward_accuracy"], dpo["reward_margin"]) == (1.0, 0.2) and "logp_margin" not in dpo
    assert get_objective("sft").log_values(log[0]) == {}


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_orpo_and_simpo_count_their_real_tokens(llama_base, monkeypatch, objective):
    """Each step's tokens are the non-padding tokens of both sides of its pairs, as a DPO step's are."""
    counted = []
    trainer_class = get_objective(objective).trainer_class()
    real = trainer_class.compute_loss

    def counting(self, model, inputs, *args, **kwargs):
        if model.training:
            counted.append(int(inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum()))
        return real(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(trainer_class, "compute_loss", counting)
    run = train(llama_base, objective)
    assert [r["tokens"] for r in run.history] == counted and all(counted)
    assert run.metrics["tokens_per_second"] > 0
