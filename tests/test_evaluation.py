"""Evaluation you can look at: task metrics on generated answers, the predictions table (base vs tuned, worst
first, filters, HTML, saved with the run), the base as the reference row of a comparison, per-example
agreement and the paired bootstrap interval."""

from __future__ import annotations

import math

import pytest

import nbtune
import nbtune.engine.workbench as workbench
from nbtune.engine.evaluation import scoring as evaluation
from nbtune.engine.evaluation.generation import generate_texts
from nbtune.engine.evaluation.predictions import Predictions, read_rows
from nbtune.errors import ConfigError, DataError, NbtuneError, NbtuneWarning
from nbtune.widgets.formatters import html_of

FAST = {"steps": 2, "batch_size": 4, "lr": 1e-2, "eval_split": 0.25, "precision": "fp32"}


def answer_length(prediction: str, reference: str) -> float:
    """A custom metric: 1 when the answer is as long as the reference, less the further off it is."""
    return 1.0 / (1 + abs(len(prediction) - len(reference)))


@pytest.fixture
def scored_run(tiny_model_dir, demo_rows):
    return nbtune.finetune(name="scored", model=str(tiny_model_dir), data=demo_rows,
                           metric=["exact_match", "token_f1", answer_length], **FAST)


def test_every_metric_is_scored_per_row_for_the_tuned_and_the_base_model(scored_run):
    rows = scored_run.prediction_rows
    assert len(rows) == 8 == scored_run.metrics["samples"]  # eval_split 0.25 of 32 rows
    for name in ("exact_match", "token_f1", "answer_length"):
        assert scored_run.metrics[name] == pytest.approx(sum(r[name] for r in rows) / len(rows))
        assert scored_run.metrics[f"base_{name}"] == pytest.approx(sum(r[f"base_{name}"] for r in rows) / len(rows))
    assert [r["reference"] for r in rows] == [a for _, a in scored_run.eval_pairs[:8]]
    for row in rows:
        assert row["answer_length"] == answer_length(row["tuned"], row["reference"])
        assert row["exact_match"] == float(row["tuned"].strip() == row["reference"].strip())


def test_the_base_answers_are_the_pristine_bases_own(scored_run):
    base = workbench.WORKBENCH.base(scored_run.config)
    prompts = [p for p, _ in scored_run.eval_pairs[:8]]
    budget = evaluation.answer_budget(scored_run.tokenizer, [a for _, a in scored_run.eval_pairs[:8]])
    expected = generate_texts(base.model, scored_run.tokenizer, prompts, max_new_tokens=budget)
    assert [r["base"] for r in scored_run.prediction_rows] == expected


def test_the_base_answers_are_generated_once_per_base_and_rows(tiny_model_dir, demo_rows, monkeypatch):
    calls = []
    real = evaluation._generate_base_answers
    monkeypatch.setattr(evaluation, "_BASE_ANSWERS", type(evaluation._BASE_ANSWERS)())
    monkeypatch.setattr(evaluation, "_generate_base_answers", lambda *a: calls.append(1) or real(*a))
    for name, method in (("first", "lora"), ("second", "ia3")):
        nbtune.finetune(name=name, method=method, model=str(tiny_model_dir), data=demo_rows, metric="token_f1",
                        **FAST)
    assert len(calls) == 1
    assert nbtune.runs["first"].metrics["base_token_f1"] == nbtune.runs["second"].metrics["base_token_f1"]


def test_predictions_are_worst_first_and_shown_without_generating_again(scored_run, monkeypatch):
    monkeypatch.setattr(evaluation, "answers", _no_generation)
    table = scored_run.predictions(by="answer_length")
    scores = [r["answer_length"] for r in table]
    assert scores == sorted(scores) and len(table) == 8
    assert table.df.shape[0] == 8 and {"prompt", "reference", "base", "tuned"} <= set(table.df.columns)
    assert len(scored_run.predictions(wrong=True)) == 8 - sum(r["exact_match"] for r in table)


def test_a_saved_run_brings_its_predictions_back_without_generating(scored_run, monkeypatch):
    folder = scored_run.saved_to
    assert read_rows(folder) == scored_run.prediction_rows
    monkeypatch.setattr(evaluation, "answers", _no_generation)
    loaded = nbtune.load(folder)
    assert loaded.predictions().rows == scored_run.predictions().rows
    history_row = nbtune.history()["scored"]
    from nbtune.engine.records.history import saved_record

    assert saved_record(history_row).prediction_rows == scored_run.prediction_rows


def test_predictions_generate_when_the_run_scored_nothing(tiny_model_dir, demo_rows):
    run = nbtune.finetune(name="quiet", model=str(tiny_model_dir), data=demo_rows, metric="none", **FAST)
    assert run.prediction_rows == [] and "exact_match" not in run.metrics
    table = run.predictions()  # exact match by default, generated now, and written beside run.json
    assert len(table) == 8 and table.metrics == ["exact_match"]
    assert read_rows(run.saved_to) == run.prediction_rows


def test_perplexity_is_exp_of_the_eval_loss(tiny_model_dir, demo_rows):
    run = nbtune.finetune(name="ppl", model=str(tiny_model_dir), data=demo_rows, metric=["eval_loss", "perplexity"],
                          **FAST)
    assert run.metrics["perplexity"] == pytest.approx(math.exp(run.metrics["eval_loss"]))
    assert run.prediction_rows == []  # loss metrics generate nothing


def test_a_metric_function_that_always_fails_is_named_before_any_weights_load(tiny_model_dir, demo_rows):
    def broken(prediction, reference):
        raise ValueError("no idea")

    with pytest.raises(NbtuneError, match="broken") as caught:
        nbtune.finetune(name="bad", model=str(tiny_model_dir), data=demo_rows, metric=broken, **FAST)
    assert "row" in str(caught.value)
    assert workbench.WORKBENCH.bases == {}  # refused before the base loaded


def test_a_metric_that_fails_on_an_answer_keeps_the_trained_run(tiny_model_dir, demo_rows):
    def picky(prediction, reference):
        if prediction != reference:
            raise ValueError("only perfect answers please")
        return 1.0

    with pytest.warns(NbtuneWarning, match="picky"):
        run = nbtune.finetune(name="picky", model=str(tiny_model_dir), data=demo_rows, metric=picky, **FAST)
    assert run.status == "finished" and run.saved_to is not None and "picky" in run.error


def test_text_eval_data_cannot_be_scored_on_answers(tiny_model_dir):
    rows = [{"text": f"line {i}"} for i in range(12)]
    with pytest.raises(DataError, match="answer"):
        nbtune.finetune(model=str(tiny_model_dir), data=rows, eval_split=0.25, metric="exact_match")


def test_an_unknown_metric_gets_a_did_you_mean():
    with pytest.raises(ConfigError, match="token_f1"):
        nbtune.RunConfig.parse(metric="token_f")


def test_the_comparison_has_the_base_as_reference_row_agreement_and_a_bootstrap(tiny_model_dir, demo_rows):
    for name, lr in (("a", 1e-2), ("b", 1e-3)):
        nbtune.finetune(name=name, model=str(tiny_model_dir), data=demo_rows, metric=["token_f1", "exact_match"],
                        **{**FAST, "lr": lr})
    cmp = nbtune.compare("a", "b")
    table = cmp.table()
    assert table[0]["run"] == f"base: {tiny_model_dir.name}"
    assert table[0]["token_f1"] == nbtune.runs["a"].metrics["base_token_f1"]
    assert [r["run"] for r in table[1:]] == ["a", "b"] and table[1]["token_f1"] == nbtune.runs["a"].metrics["token_f1"]
    rows = cmp.agreement()
    assert len(rows) == 8 and {"base", "a", "b"} <= set(rows[0])
    result = cmp.bootstrap(resamples=200)
    assert result["a"] == "a" and result["b"] == "b" and result["rows"] == 8 and result["metric"] == "token_f1"
    assert result["low"] <= result["difference"] <= result["high"]
    expected = nbtune.runs["a"].metrics["token_f1"] - nbtune.runs["b"].metrics["token_f1"]
    assert result["difference"] == pytest.approx(expected)
    against_base = cmp.bootstrap("a", "base", resamples=100)
    assert against_base["b"] == f"base: {tiny_model_dir.name}"
    page = html_of(cmp)
    assert "is it real?" in page and "per-example agreement" in page and f"base: {tiny_model_dir.name}" in page


def test_a_stop_ends_generation_after_the_current_batch(llama_base):
    model, tokenizer = llama_base
    asked = iter([False, True])
    got = evaluation.answers(model, tokenizer, ["hi"] * 40, max_new_tokens=2, desc="t", should_stop=lambda: next(asked))
    assert len(got) == evaluation.BATCH


# ---------------------------------------------------------------- the table itself, on rows we choose
ROWS = [
    {"row": 0, "prompt": "p0", "reference": "1976-07-04", "base": "July 4", "tuned": "1976-07-04",
     "exact_match": 1.0, "base_exact_match": 0.0},
    {"row": 1, "prompt": "p1", "reference": "2000-01-01", "base": "2000-01-01", "tuned": "2000-01-02",
     "exact_match": 0.0, "base_exact_match": 1.0},
    {"row": 2, "prompt": "<b>p2</b>", "reference": "1999-12-31", "base": "1999", "tuned": "1999",
     "exact_match": 0.0, "base_exact_match": 0.0},
]


def test_filters_pick_the_rows_they_say():
    table = Predictions(ROWS, ["exact_match"], run="x").sort()
    assert [r["row"] for r in table] == [1, 2, 0]  # worst first, then eval order
    assert [r["row"] for r in table.wrong()] == [1, 2]
    assert [r["row"] for r in table.right()] == [0]
    assert [r["row"] for r in table.fixed()] == [0]
    assert [r["row"] for r in table.broken()] == [1]
    assert [r["row"] for r in table.changed()] == [1, 0]
    assert [r["row"] for r in table.sort(worst_first=False)] == [0, 1, 2]
    with pytest.raises(NbtuneError, match="exact_match"):
        table.sort("exact_matc")


def test_the_html_highlights_differences_and_escapes_the_data():
    page = html_of(Predictions(ROWS, ["exact_match"], run="x"))
    assert "&lt;b&gt;p2&lt;/b&gt;" in page and "<b>p2</b>" not in page
    assert "class='miss'" in page and "class='same'" in page  # 2000-01-02 against 2000-01-01
    assert "1 fixed, 1 broken, 2 changed by tuning" in page
    assert "<script" not in page
    text = repr(Predictions(ROWS, ["exact_match"], run="x"))
    assert text.startswith("run 'x': 3 rows ·") and "reference: 1976-07-04" in text
    assert repr(table_of_rows().broken()).startswith("run 'x': 1 of 3 rows broken by tuning")
    assert "0 of 3 rows broken by tuning" in html_of(table_of_rows().fixed().broken())


def table_of_rows() -> Predictions:
    return Predictions(ROWS, ["exact_match"], run="x")


def _no_generation(*args, **kwargs):
    raise AssertionError("generated again")


def test_a_metric_function_is_written_by_its_import_path_and_a_notebook_one_left_out(tmp_path, monkeypatch):
    (tmp_path / "team_metrics.py").write_text("def close(prediction, reference):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import team_metrics

    config = nbtune.RunConfig.parse(metric=["exact_match", team_metrics.close, lambda p, r: 0.0])
    assert "metric:\n- exact_match\n- team_metrics:close\n" in config.to_text()
    assert config.to_json_dict()["metric"] == ["exact_match", "team_metrics:close"]
    again = nbtune.RunConfig.parse(config.to_text())
    from nbtune.engine.evaluation.metrics import resolve_metrics

    assert [m.name for m in resolve_metrics(again.metric, demo=False)] == ["exact_match", "close"]


def test_a_saved_run_opens_where_its_metric_module_is_missing(tmp_path, monkeypatch, tiny_model_dir, demo_rows):
    (tmp_path / "gone_metrics.py").write_text("def close(prediction, reference):\n    return 0.5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run = nbtune.finetune(name="gone", model=str(tiny_model_dir), data=demo_rows,
                          metric=["token_f1", "gone_metrics:close"], **FAST)
    assert run.metrics["close"] == 0.5
    (tmp_path / "gone_metrics.py").unlink()
    monkeypatch.delitem(__import__("sys").modules, "gone_metrics")
    loaded = nbtune.load(run.saved_to)
    assert loaded.config.metric == ["token_f1"]
    assert loaded.predictions().metrics == ["token_f1", "close"]  # its scores were saved with the rows
    assert [r["close"] for r in loaded.prediction_rows] == [0.5] * 8  # the scores it gave stay
