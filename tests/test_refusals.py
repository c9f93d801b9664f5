"""Mistakes in combining adapters and in generating: one-line NbtuneErrors that say what works instead,
never peft's or transformers' traceback."""

from __future__ import annotations

import pytest
from conftest import tiny_llama

import nbtune
from nbtune.engine.workbench import Workbench

SETTINGS = {"steps": 2, "batch_size": 4, "metric": "none", "save": False, "lr": 1e-2}


@pytest.fixture
def loras(_lora_bench, monkeypatch):
    """The module's workbench of LoRA runs as this test's `nbtune.runs` (each test starts with a fresh one)."""
    monkeypatch.setattr("nbtune.engine.workbench.WORKBENCH", _lora_bench)
    return _lora_bench


@pytest.fixture(scope="module")
def _lora_bench(tiny_model_dir, tmp_path_factory, _chat_tokenizer):
    """LoRA runs r8 and r4 (and r4b, a second r=4) on one shared tiny base, and 'other' on another base
    of the same shape, trained once for the module in a workbench of their own."""
    from nbtune.data.demo import demo_splits

    demo = demo_splits()[0][:32]
    other_dir = tmp_path_factory.mktemp("other-llama")
    tiny_llama(_chat_tokenizer, seed=5).save_pretrained(other_dir)
    _chat_tokenizer.save_pretrained(other_dir)
    bench = Workbench()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("nbtune.engine.workbench.WORKBENCH", bench)
        patch.chdir(tmp_path_factory.mktemp("refusals"))
        common = {**SETTINGS, "model": str(tiny_model_dir), "data": demo}
        bench.finetune({**common, "name": "r8", "r": 8})
        bench.finetune({**common, "name": "r4", "r": 4})
        bench.finetune({**common, "name": "r4b", "r": 4, "seed": 3})
        bench.finetune({**common, "name": "other", "r": 4, "model": str(other_dir)})
        yield bench


def _one_line(exc_info: pytest.ExceptionInfo) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- combine
def test_ties_of_unequal_ranks_is_refused_before_peft_naming_the_ranks(loras, monkeypatch):
    import nbtune.engine.evaluation.adapters as adapters

    monkeypatch.setattr(adapters, "lora_stack", lambda runs: pytest.fail("peft was reached"))
    with pytest.raises(nbtune.NbtuneError) as caught:
        nbtune.combine(["r8", "r4"], [0.5, 0.5], how="ties")
    message = _one_line(caught)
    assert "'r8' has r=8" in message and "'r4' has r=4" in message
    assert "how='linear'" in message and "how='svd'" in message


def test_unequal_ranks_combine_by_svd_and_by_linear(loras):
    svd = nbtune.combine(["r8", "r4"], [0.5, 0.5], how="svd", name="by-svd")
    assert isinstance(svd.generate("hello", max_new_tokens=2), str)
    linear = nbtune.combine(["r8", "r4"], [0.5, 0.5], name="by-cat")
    assert linear.metrics["how"] == "cat"


def test_equal_ranks_still_combine_by_ties(loras):
    combined = nbtune.combine(["r4", "r4b"], [0.5, 0.5], how="ties", name="by-ties")
    assert combined.model.peft_config["default"].r == 4


@pytest.mark.parametrize(("weights", "expected"), [
    (0.5, "give a list with one number per run"),  # was: TypeError object of type 'float' has no len()
    (["a", 0.5], "finite numbers"),  # was: TypeError can't multiply sequence by non-int
    ([float("nan"), 1.0], "finite numbers"),  # was: silently a NaN adapter
    ([1.0], "one weight per run"),
])
def test_bad_weights_are_one_line(loras, weights, expected):
    with pytest.raises(nbtune.NbtuneError) as caught:
        nbtune.combine(["r4", "r4b"], weights)
    assert expected in _one_line(caught)


def test_runs_of_different_bases_are_refused(loras):
    # Before: 'other' was loaded onto r4's base and combined without a word.
    with pytest.raises(nbtune.NbtuneError) as caught:
        nbtune.combine(["r4", "other"], [0.5, 0.5])
    message = _one_line(caught)
    assert "different" in message and "'r4'" in message and "'other'" in message


def test_ties_density_out_of_range_is_refused(loras):
    from nbtune.engine.evaluation.adapters import combine

    runs = [loras.runs["r4"], loras.runs["r4b"]]
    for density in (0, 1.5):  # was: silently an empty adapter, or the whole one
        with pytest.raises(nbtune.NbtuneError, match="density"):
            combine(runs, [0.5, 0.5], how="ties", density=density)


# ---------------------------------------------------------------- generate
@pytest.mark.parametrize("value", [0, -3, 1.5, "10", None])
def test_max_new_tokens_must_be_a_positive_whole_number(loras, value):
    with pytest.raises(nbtune.NbtuneError) as caught:
        loras.runs["r4"].generate("hi", max_new_tokens=value)
    assert "`max_new_tokens`" in _one_line(caught) and caught.value.field == "max_new_tokens"


def test_an_unknown_generate_keyword_names_it_and_points_to_max_new_tokens(loras):
    with pytest.raises(nbtune.NbtuneError) as caught:
        loras.runs["r4"].generate("hi", max_tokens=10)
    message = _one_line(caught)
    assert "`max_tokens`" in message and "`max_new_tokens`" in message


@pytest.mark.parametrize(("options", "named"), [
    ({"num_beams": 0}, "num_beams"),  # was: ZeroDivisionError
    ({"do_sample": True, "temperature": 0.0}, "temperature"),
    ({"num_return_sequences": 2}, "num_return_sequences"),
    ({"input_ids": [1, 2]}, "input_ids"),  # was: TypeError, got multiple values
    ({"batch_size": 0}, "batch_size"),
])
def test_other_generate_mistakes_are_one_line(loras, options, named):
    with pytest.raises(nbtune.NbtuneError) as caught:
        loras.runs["r4"].generate("hi", max_new_tokens=2, **options)
    assert named in _one_line(caught)


def test_keywords_nbtune_sets_can_be_overridden(loras):
    run = loras.runs["r4"]
    # pad_token_id and use_cache were passed twice (a TypeError); stop_strings needs the tokenizer.
    assert isinstance(run.generate("hi", max_new_tokens=2, use_cache=False, pad_token_id=0), str)
    assert isinstance(run.generate("hi", max_new_tokens=2, stop_strings=["\n"]), str)


def test_a_mixed_lora_batch_checks_max_new_tokens_too(loras):
    with pytest.raises(nbtune.NbtuneError) as caught:
        nbtune.compare("r4", "r4b").generations(["hi"], max_new_tokens=0)
    assert "`max_new_tokens`" in _one_line(caught)
