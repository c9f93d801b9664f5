"""Objectives are registered like methods: an `ObjectiveSpec` declares its keys, data, hooks, reports and
refusals; registration refuses what is malformed; a config routes each top-level key to the run settings, the
method's options or the objective's keys, and keeps them flat in its dict, YAML and run.json."""

from __future__ import annotations

import dataclasses
import doctest
from pathlib import Path

import pytest

import nbtune.config.objective_keys
import nbtune.objectives.registry as registry
from nbtune.config import RunConfig
from nbtune.config.params import Param
from nbtune.errors import ConfigError
from nbtune.methods import register_method
from nbtune.methods import registry as method_registry
from nbtune.objectives import (
    Curve,
    all_objectives,
    get_objective,
    register_objective,
    report_columns,
)

PACKAGE = Path(__file__).resolve().parents[1] / "nbtune"


@pytest.fixture
def registries():
    """Snapshot both registries and restore them after the test."""
    method_registry.all_methods()  # the built-ins loaded, so that restoring keeps them
    objectives, methods = dict(registry._REGISTRY), dict(method_registry._REGISTRY)
    yield registry._REGISTRY
    registry._REGISTRY.clear()
    registry._REGISTRY.update(objectives)
    method_registry._REGISTRY.clear()
    method_registry._REGISTRY.update(methods)


def toy(**changes):
    """sft's hooks under another name, with a key of its own: what a new objective's module registers."""
    sft = get_objective("sft")
    base = dataclasses.replace(sft, name="toy", kind="toy-tuning", params=(Param("warmth", "float", 0.5, "How warm."),),
                               log_keys={"toy/score": "toy_score"},
                               curves=(Curve("toy_score", "toy score", "how toy it is", "line"),),
                               columns=("toy_score",))
    return dataclasses.replace(base, **changes)


# ------------------------------------------------------------------ the registry
def test_the_modules_examples_run():
    for module in (registry, nbtune.config.objective_keys):
        result = doctest.testmod(module)
        assert result.attempted and not result.failed


def test_the_builtin_objectives_are_registered_each_from_its_own_module():
    assert [spec.name for spec in all_objectives()] == ["dpo", "kto", "orpo", "sft", "simpo"]
    for spec in all_objectives():
        assert (PACKAGE / "objectives" / f"{spec.name}.py").is_file()
        assert spec.tokenize.__module__.startswith("nbtune.objectives.")
    assert get_objective("sft").params == () and get_objective("dpo").option_names() == (
        "beta", "loss_type", "precompute_ref")
    assert get_objective("simpo").param("beta").default == 2.0 and get_objective("orpo").param("beta").default == 0.1


def test_an_unknown_objective_names_the_nearest_and_the_known_ones():
    known = r"Did you mean `orpo`\?.*Known objectives: dpo, kto, orpo, sft, simpo"
    with pytest.raises(ConfigError, match=known) as info:
        get_objective("orpp")
    assert info.value.field == "objective"
    assert get_objective("SimPO") is get_objective("simpo")  # as papers write it


@pytest.mark.parametrize("changes, match", [
    ({"name": "Toy"}, "lowercase letters"),
    ({"name": "sft"}, "already registered; pass replace=True"),
    ({"params": (Param("steps", "int", 1, "clashes"),)}, "clash with run settings; rename them"),
    ({"params": (Param("objective_options", "any", None, "clashes"),)}, "clash with run settings"),
    ({"params": (Param("k", "int", 1, "k"), Param("k", "int", 2, "k"))}, "key names repeat"),
    ({"params": (Param("k", "int", 0, "k", min=1),)}, "outside its range"),
    ({"trainer": None}, "`trainer` must be a callable"),
    ({"formats": ()}, "names no data format"),
    ({"columns": ("nothing",)}, "`nothing` is no key it reports"),
    ({"curves": ()}, "column `toy_score` has no `Curve`"),
    ({"curves": (Curve("toy_score", "t", "m", "bar"),)}, "use 'line', 'title' or ''"),
    ({"margins": {"gap": ("toy_score", "missing")}}, "both must be run keys"),
])
def test_registration_refuses_a_malformed_spec_saying_how_to_fix_it(registries, changes, match):
    before = dict(registries)
    with pytest.raises(ConfigError, match=match):
        register_objective(toy(**changes))
    assert registries == before


def test_a_new_objective_plugs_in_with_its_own_keys_and_columns(registries):
    register_objective(toy())
    config = RunConfig.parse(objective="toy", warmth=0.9, steps=3)
    assert config.objective_options == {"warmth": 0.9} and "warmth" not in config.options
    assert list(config.to_dict())[list(config.to_dict()).index("objective") + 1] == "warmth"  # flat, after it
    assert RunConfig.parse(config.to_text()).objective_options == {"warmth": 0.9}
    assert get_objective("toy").log_values({"toy/score": 3.0, "loss": 1.0}) == {"toy_score": 3.0}
    assert report_columns(["sft", "toy", "dpo"]) == ["reward_accuracy", "reward_margin", "toy_score"]
    with pytest.raises(ConfigError, match=r"`warmth` is a toy-tuning setting and this run's `objective` is dpo; "
                                          r"set `objective: toy`, or remove `warmth`\.") as info:
        RunConfig.parse(objective="dpo", warmth=0.9)
    assert info.value.field == "warmth"


# ------------------------------------------------------------------ keys in a config
def test_objective_keys_are_flat_in_the_dict_yaml_and_run_json():
    config = RunConfig.parse(objective="dpo", beta=0.3, loss_type="ipo", steps=4)
    flat = config.to_dict()
    keys = list(flat)
    assert keys[keys.index("objective") + 1: keys.index("objective") + 4] == ["beta", "loss_type", "precompute_ref"]
    assert "objective_options" not in flat and "objective_options" not in config.to_json_dict()
    assert config.to_json_dict()["beta"] == 0.3
    assert "beta: 0.3" in config.to_text() and "precompute_ref" not in config.to_text()  # a default it derived
    again = RunConfig.parse(flat)
    assert again.objective_options == config.objective_options == {"beta": 0.3, "loss_type": "ipo",
                                                                   "precompute_ref": False}


def test_an_sft_run_has_no_objective_keys():
    config = RunConfig.parse({})
    assert config.objective == "sft" and config.objective_options == {}
    assert not {"beta", "loss_type", "precompute_ref"} & set(config.to_dict())


def test_defaults_are_derived_so_another_objective_takes_its_own():
    dpo = RunConfig.parse(objective="dpo", beta=0.2)
    assert dpo.derived["loss_type"] == "sigmoid" and "beta" not in dpo.derived  # set by the user
    orpo = RunConfig.parse(dpo, objective="orpo")
    assert orpo.objective_options == {"beta": 0.2}  # beta carried over, dpo's loss_type and precompute_ref dropped
    simpo = RunConfig.parse(RunConfig.parse(objective="dpo"), objective="simpo")
    assert simpo.objective_options == {"beta": 2.0}  # dpo's default beta was derived: simpo's own instead
    with pytest.raises(ConfigError, match="has one loss"):
        RunConfig.parse(RunConfig.parse(objective="dpo", loss_type="ipo"), objective="orpo")  # set, not derived


def test_a_nested_objective_options_mapping_is_read_too():
    assert RunConfig.parse(objective="kto", objective_options={"beta": 0.5}).objective_options["beta"] == 0.5
    with pytest.raises(ConfigError, match="`objective_options` has `bta`"):
        RunConfig.parse(objective="kto", objective_options={"bta": 0.5})


def test_a_key_of_other_objectives_names_them_and_the_fix():
    with pytest.raises(ConfigError) as info:
        RunConfig.parse(loss_type="ipo")
    assert str(info.value) == ("`loss_type` is a preference-tuning setting and this run's `objective` is sft; set "
                               "`objective: dpo` (or kto), or remove `loss_type`.")


def test_a_key_that_is_both_a_method_option_and_an_objective_key_is_refused(registries):
    lora = method_registry.get_method("lora")
    beta = Param("beta", "float", 1.0, "a method's own beta")
    register_method(dataclasses.replace(lora, name="lora_beta", params=(*lora.params, beta)))
    with pytest.raises(ConfigError, match=r"`beta` is both an option of method 'lora_beta' and a key of "
                                          r"`objective: dpo`") as info:
        RunConfig.parse(method="lora_beta", objective="dpo", beta=0.2)
    assert info.value.field == "beta"
    assert RunConfig.parse(method="lora_beta", beta=0.2).options["beta"] == 0.2  # sft has no beta: the method's


def test_a_typo_of_an_objective_key_gets_a_did_you_mean():
    with pytest.raises(ConfigError, match="Did you mean `beta`"):
        RunConfig.parse(objective="dpo", betta=0.2)


def test_the_methods_refusals_are_declared_by_the_objective():
    refusing = {spec.name for spec in all_objectives() if spec.method_refusals}
    assert refusing == {"dpo", "kto"}
    assert RunConfig.parse(objective="orpo", method="adalora").objective == "orpo"


# ------------------------------------------------------------------ what views may name
def test_no_view_names_a_trainers_raw_log_key():
    """The panel and compare render what the specs declare (run keys), never TRL's logged names."""
    raw = {theirs for spec in all_objectives() for theirs, ours in spec.log_keys.items() if theirs != ours}
    assert "rewards/margins" in raw
    views = [*sorted((PACKAGE / "widgets").glob("*.py")), PACKAGE / "engine" / "evaluation" / "compare.py"]
    named = [f"{path.name}: {key}" for path in views for key in raw if key in path.read_text()]
    assert not named, named


def test_every_column_and_drawn_curve_says_what_it_means():
    for spec in all_objectives():
        for curve in spec.curves:
            assert curve.meaning and curve.label, (spec.name, curve.key)
        assert {c.key for c in spec.curves} >= set(spec.columns)


# ------------------------------------------------------------------ keys that vary (one per reward function)
def test_a_log_key_with_a_star_reports_one_run_key_per_match_and_the_panel_draws_each(registries):
    from types import SimpleNamespace

    from nbtune.widgets.render import rewards_chart

    register_objective(toy(log_keys={"rewards/*/mean": "reward_*", "reward": "reward"},
                           curves=(Curve("reward_*", "reward *", "mean of one reward function", "line"),
                                   Curve("reward", "reward", "sum of the rewards", "title")),
                           columns=("reward",)))
    spec = get_objective("toy")
    logs = {"rewards/exact_match/mean": 0.5, "rewards/format/mean": 1.0, "reward": 1.5, "rewards/x/std": 0.1}
    assert spec.log_values(logs) == {"reward_exact_match": 0.5, "reward_format": 1.0, "reward": 1.5}
    assert spec.log_values({"eval_rewards/format/mean": 0.25}, prefix="eval_") == {"reward_format": 0.25}
    history = [{"step": s, **spec.log_values(logs)} for s in (1, 2)]
    drawn = spec.curves_in([k for r in history for k in r], "line")
    assert [(c.key, c.label) for c in drawn] == [("reward_exact_match", "reward exact_match"),
                                                 ("reward_format", "reward format")]
    run = SimpleNamespace(config=RunConfig.parse(objective="toy"), history=history, eval_history=[], total_steps=2)
    chart = rewards_chart(run)
    assert chart.count("<svg") == 2 and "reward exact_match" in chart and "train reward 1.50" in chart
    with pytest.raises(ConfigError, match="one `\\*` on both sides"):
        register_objective(toy(name="toy2", log_keys={"rewards/*/mean": "reward"}))
