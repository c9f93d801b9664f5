"""Task metrics (nbtune/engine/evaluation/metrics.py): scores on known pairs, config-time refusals, custom functions,
the JSON form of a spec, and the paired bootstrap. No model is loaded."""

from __future__ import annotations

import doctest
import math
import textwrap

import pytest
import sacrebleu
from rouge_score import rouge_scorer

import nbtune
import nbtune.engine.evaluation.metrics as metrics_module
from nbtune.engine.evaluation.metrics import (
    METRICS,
    aggregate_scores,
    check_metric_spec,
    generation_metrics,
    metric_spec_json,
    paired_bootstrap,
    resolve_metrics,
    score_rows,
)
from nbtune.errors import ConfigError, NbtuneError

PREDICTIONS = ["the cat sat on the mat", "a dog barked loudly", "Paris", ""]
REFERENCES = ["the cat is on the mat", "the dog barked", "Paris", ""]


def row_scores(name, predictions=PREDICTIONS, references=REFERENCES):
    return [row[name] for row in score_rows([METRICS[name]], predictions, references)]


def score_of(name, predictions=PREDICTIONS, references=REFERENCES):
    return aggregate_scores([METRICS[name]], predictions, references)[name]


@pytest.fixture
def metric_module(tmp_path, monkeypatch):
    """A small module of metric functions on sys.path, as a user's own file would be."""
    (tmp_path / "my_metrics.py").write_text(textwrap.dedent("""
        def keyword_hit(prediction, reference):
            return reference.split()[0] in prediction

        def boom(prediction, reference):
            if len(prediction) > 20:
                raise ValueError("no keyword here")
            return 1.0

        def nan_score(prediction, reference):
            return float("nan")

        def text_score(prediction, reference):
            return "0.5"

        def one_argument(prediction):
            return 1.0

        NOT_A_FUNCTION = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_metrics"
    import sys

    sys.modules.pop("my_metrics", None)


# ---- each metric on known pairs ----------------------------------------------------------------------------

def test_exact_match_trims_whitespace():
    assert row_scores("exact_match", [" Paris\n", "paris", ""], ["Paris", "Paris", ""]) == [1.0, 0.0, 1.0]
    assert score_of("exact_match") == 0.5


def test_token_f1_follows_squad():
    # "the"/"a" and punctuation go, case is ignored: {cat, sat, on, mat} vs {cat, is, on, mat} share 3 of 4
    assert row_scores("token_f1", ["The cat sat on the mat."], ["the cat is on the mat"]) == [0.75]
    assert row_scores("token_f1", ["Paris, France", "x", "", "the"], ["paris", "y", "", ""]) == \
        [pytest.approx(2 / 3), 0.0, 1.0, 1.0]  # both empty (articles only) agree


def test_rouge_l_is_rouge_scores():
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expected = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(PREDICTIONS, REFERENCES, strict=True)]
    assert row_scores("rouge_l") == pytest.approx(expected)
    assert score_of("rouge_l") == pytest.approx(sum(expected) / len(expected))


def test_bleu_is_sacrebleus():
    bleu = sacrebleu.metrics.BLEU(effective_order=True)
    expected = [bleu.sentence_score(p, [r]).score for p, r in zip(PREDICTIONS, REFERENCES, strict=True)]
    assert row_scores("bleu") == pytest.approx(expected)
    assert score_of("bleu") == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score)
    assert row_scores("bleu", ["Paris"], ["Paris"]) == [pytest.approx(100.0)] and METRICS["bleu"].best == 100.0


def test_chrf_is_sacrebleus():
    expected = [sacrebleu.sentence_chrf(p, [r]).score for p, r in zip(PREDICTIONS, REFERENCES, strict=True)]
    assert row_scores("chrf") == pytest.approx(expected)
    assert score_of("chrf") == pytest.approx(sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES]).score)


def test_corpus_counts_sum_to_the_corpus_score():
    # The bootstrap scores a sample from summed sentence counts: on all rows that must be sacrebleu's score.
    for name in ("bleu", "chrf"):
        counts, score = METRICS[name].corpus_stats(PREDICTIONS, REFERENCES)
        total = [sum(column) for column in zip(*counts, strict=True)]
        assert score(total) == pytest.approx(score_of(name))


def test_loss_metrics_have_no_answer_scores():
    loss = [METRICS["eval_loss"], METRICS["perplexity"]]
    assert all(m.kind == "loss" and m.row is None for m in loss)
    assert "exp(eval_loss)" in METRICS["perplexity"].description
    assert generation_metrics([*loss, METRICS["bleu"]]) == [METRICS["bleu"]]
    assert score_rows(loss, ["a"], ["a"]) == [{}]
    with pytest.raises(NbtuneError, match="evaluation loss"):
        METRICS["eval_loss"].aggregate(["a"], ["a"])


def test_scoring_refuses_mismatched_lengths_and_gives_nan_for_no_rows():
    with pytest.raises(NbtuneError, match="2 predictions for 1 references"):
        score_rows([METRICS["exact_match"]], ["a", "b"], ["a"])
    assert math.isnan(METRICS["exact_match"].aggregate([], []))
    assert math.isnan(METRICS["bleu"].aggregate([], []))


def test_aggregate_uses_the_rows_given():
    metrics = resolve_metrics(["exact_match", "bleu"], demo=False)
    rows = score_rows(metrics, PREDICTIONS, REFERENCES)
    assert aggregate_scores(metrics, PREDICTIONS, REFERENCES, rows) == aggregate_scores(metrics, PREDICTIONS,
                                                                                       REFERENCES)
    doctored = [{**row, "exact_match": 1.0} for row in rows]  # a mean of rows takes them as given
    assert aggregate_scores(metrics, PREDICTIONS, REFERENCES, doctored)["exact_match"] == 1.0


def test_the_modules_example_runs():
    result = doctest.testmod(metrics_module)
    assert result.attempted and not result.failed


# ---- the spec, checked at config time ----------------------------------------------------------------------

@pytest.mark.parametrize(("typo", "suggestion"), [("exact_mach", "exact_match"), ("rouge", "rouge_l"),
                                                  ("f1", "token_f1"), ("ppl", "perplexity")])
def test_unknown_names_get_a_did_you_mean(typo, suggestion):
    with pytest.raises(ConfigError, match=f"Did you mean `{suggestion}`") as info:
        check_metric_spec(typo)
    assert info.value.field == "metric" and "\n" not in str(info.value)


def test_spec_forms():
    assert check_metric_spec("auto") == "auto" and check_metric_spec(" None ") == "none"
    assert check_metric_spec(None) == "none"
    assert check_metric_spec("BLEU") == ["bleu"]
    assert check_metric_spec(["bleu", "exact_match", "bleu"]) == ["bleu", "exact_match"]  # order kept
    assert check_metric_spec("exact_match, chrf") == ["exact_match", "chrf"]
    assert check_metric_spec(("token_f1",)) == ["token_f1"]


def test_spec_refusals(metric_module):
    refusals = {
        "stand alone": ["auto", "bleu"],
        "is empty": [],
        "got int": 3,
        "got set": {"bleu"},
        "importing 'no_such_module' failed: ModuleNotFoundError": "no_such_module:f",
        "has no `keyword_hits`. Did you mean `keyword_hit`?": f"{metric_module}:keyword_hits",
        "is a int, not a function": f"{metric_module}:NOT_A_FUNCTION",
        "must take two arguments": f"{metric_module}:one_argument",
        "is not a 'module:function' path": ":keyword_hit",
    }
    for message, spec in refusals.items():
        with pytest.raises(ConfigError, match=message) as info:
            check_metric_spec(spec)
        assert info.value.field == "metric"
    with pytest.raises(ConfigError, match="must take two arguments"):
        check_metric_spec(lambda prediction: 1.0)
    with pytest.raises(ConfigError, match="must take two arguments"):
        check_metric_spec("os.path:exists")  # a real function, but of one argument


def test_run_config_keeps_the_list():
    data = [{"prompt": "a", "completion": "b"}]
    assert nbtune.RunConfig.parse({"metric": ["exact_match", "bleu"], "data": data}).metric == ["exact_match", "bleu"]
    config = nbtune.RunConfig.parse({"metric": "bleu", "data": data})
    assert config.metric == ["bleu"]
    assert config.to_json_dict()["metric"] == ["bleu"]
    assert nbtune.RunConfig.parse(config.to_text()).metric == ["bleu"]
    with pytest.raises(ConfigError, match="Did you mean `exact_match`"):
        nbtune.RunConfig.parse({"metric": "exact_mach", "data": data})


# ---- functions and 'module:function' paths ----------------------------------------------------------------

def test_a_module_path_resolves_and_a_bool_counts_as_0_or_1(metric_module):
    spec = check_metric_spec([f"{metric_module}:keyword_hit", "exact_match"])
    assert spec == ["my_metrics:keyword_hit", "exact_match"]
    metrics = resolve_metrics(spec, demo=False)
    assert [m.name for m in metrics] == ["keyword_hit", "exact_match"]
    rows = score_rows(metrics, ["Paris it is", "Rome"], ["Paris", "Paris"])
    assert rows == [{"keyword_hit": 1.0, "exact_match": 0.0}, {"keyword_hit": 0.0, "exact_match": 0.0}]


def test_resolving_auto_none_and_names():
    assert resolve_metrics("auto", demo=True) == [METRICS["exact_match"]]
    assert resolve_metrics("auto", demo=False) == [] and resolve_metrics("none", demo=True) == []
    assert resolve_metrics(["chrf", "eval_loss"], demo=False) == [METRICS["chrf"], METRICS["eval_loss"]]


def test_functions_are_named_after_themselves_and_lambdas_custom():
    def bleu(prediction, reference):  # clashes with the built-in name
        return 0.0

    metrics = resolve_metrics([lambda p, r: 1.0, lambda p, r: 0.0, bleu, "bleu"], demo=False)
    assert [m.name for m in metrics] == ["custom", "custom_2", "bleu_2", "bleu"]
    assert all(m.kind == "generation" for m in metrics)
    assert score_rows(metrics[:2], ["x"], ["y"]) == [{"custom": 1.0, "custom_2": 0.0}]


def test_a_function_that_raises_names_the_metric_and_the_row(metric_module):
    metrics = resolve_metrics(f"{metric_module}:boom", demo=False)
    long_answer = "an answer " * 20
    with pytest.raises(NbtuneError, match=r"metric `boom` failed on row 1 \(prediction 'an answer an answer"
                                          r".*…', reference 'Rome'\): ValueError: no keyword here") as info:
        score_rows(metrics, ["fine", long_answer], ["Paris", "Rome"])
    assert "\n" not in str(info.value) and isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize(("function", "shown"), [("nan_score", "float 'nan'"), ("text_score", "str '0.5'")])
def test_a_score_must_be_a_finite_number(metric_module, function, shown):
    metrics = resolve_metrics(f"{metric_module}:{function}", demo=False)
    with pytest.raises(NbtuneError, match=f"metric `{function}` returned {shown} on row 0 .*finite number"):
        score_rows(metrics, ["a"], ["b"])
    with pytest.raises(NbtuneError, match="returned NoneType"):
        score_rows(resolve_metrics(lambda p, r: None, demo=False), ["a"], ["b"])


# ---- the spec as JSON and YAML hold it --------------------------------------------------------------------

def test_metric_spec_json(metric_module):
    import importlib

    keyword_hit = importlib.import_module(metric_module).keyword_hit

    def nested(prediction, reference):
        return 1.0

    assert metric_spec_json("auto") == "auto" and metric_spec_json("none") == "none"
    assert metric_spec_json(["bleu", keyword_hit, lambda p, r: 1.0]) == ["bleu", "my_metrics:keyword_hit"]
    assert metric_spec_json([lambda p, r: 1.0, nested]) == "none"  # nothing that an import could find again
    assert metric_spec_json(math.dist) == ["math:dist"]
    # The path reads back into the same function.
    assert resolve_metrics(metric_spec_json([keyword_hit]), demo=False)[0].row is keyword_hit


# ---- the paired bootstrap ---------------------------------------------------------------------------------

def test_identical_systems_differ_by_nothing():
    answers = ["a", "b", "c", "d"] * 5
    references = ["a", "b", "x", "y"] * 5
    result = paired_bootstrap(METRICS["exact_match"], answers, answers, references, resamples=200)
    assert (result["difference"], result["low"], result["high"]) == (0.0, 0.0, 0.0)
    assert result["share_a_better"] == result["share_b_better"] == 0.0
    assert result["rows"] == 20 and result["resamples"] == 200 and result["confidence"] == 0.95


def test_a_clearly_better_system_gets_an_interval_above_zero():
    references = [str(i) for i in range(40)]
    half_right = [r if i % 2 else "wrong" for i, r in enumerate(references)]
    result = paired_bootstrap(METRICS["exact_match"], references, half_right, references)
    assert (result["a"], result["b"], result["difference"]) == (1.0, 0.5, 0.5)
    assert 0.25 < result["low"] <= 0.5 <= result["high"] < 0.75
    assert result["share_a_better"] > 0.99 and result["share_b_better"] == 0.0
    assert set(result) == {"metric", "a", "b", "difference", "low", "high", "confidence", "resamples", "rows",
                           "share_a_better", "share_b_better"}


def test_the_seed_makes_it_repeatable():
    references = [str(i) for i in range(30)]
    a = [r if i % 3 else "no" for i, r in enumerate(references)]
    b = [r if i % 2 else "no" for i, r in enumerate(references)]
    first = paired_bootstrap(METRICS["token_f1"], a, b, references, resamples=300, seed=7)
    assert paired_bootstrap(METRICS["token_f1"], a, b, references, resamples=300, seed=7) == first
    assert first["low"] < first["difference"] < first["high"]


def test_bleu_bootstrap_resamples_the_corpus_score():
    result = paired_bootstrap(METRICS["bleu"], PREDICTIONS * 3, REFERENCES * 3, REFERENCES * 3, resamples=50)
    assert result["a"] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS * 3, [REFERENCES * 3]).score)
    assert all(-100 <= result[key] <= 100 for key in ("difference", "low", "high"))
    # With 4-grams in every row a copy of the references scores 100 on any sample: never beaten. (Rows of
    # under 4 words alone have no 4-grams, and corpus BLEU is 0 even for a copy: sacrebleu's definition.)
    references = ["the cat is on the mat", "the dog barked at the moon", "we flew to Paris in May"]
    answers = ["the cat sat on the mat", "a dog barked at the moon", "we went to Rome in June"]
    result = paired_bootstrap(METRICS["bleu"], answers, references, references, resamples=50)
    assert result["b"] == pytest.approx(100.0) and result["low"] <= result["high"] <= 0
    chrf = paired_bootstrap(METRICS["chrf"], PREDICTIONS, PREDICTIONS, REFERENCES, resamples=20)
    assert (chrf["low"], chrf["high"]) == (0.0, 0.0)


def test_a_corpus_metric_without_counts_still_resamples():
    from dataclasses import replace

    slow = replace(METRICS["bleu"], corpus_stats=None)
    fast = paired_bootstrap(METRICS["bleu"], PREDICTIONS, REFERENCES, REFERENCES, resamples=20, seed=3)
    assert paired_bootstrap(slow, PREDICTIONS, REFERENCES, REFERENCES, resamples=20, seed=3) == pytest.approx(fast)


def test_bootstrap_refusals():
    em = METRICS["exact_match"]
    with pytest.raises(NbtuneError, match="1 predictions of b for 2 references"):
        paired_bootstrap(em, ["a", "b"], ["a"], ["a", "b"])
    with pytest.raises(NbtuneError, match="no rows"):
        paired_bootstrap(em, [], [], [])
    with pytest.raises(NbtuneError, match="evaluation loss"):
        paired_bootstrap(METRICS["perplexity"], ["a"], ["a"], ["a"])
    for bad in ({"resamples": 0}, {"resamples": True}, {"confidence": 1.0}):
        with pytest.raises(NbtuneError, match="paired_bootstrap takes"):
            paired_bootstrap(em, ["a"], ["a"], ["a"], **bad)
