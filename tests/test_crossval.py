"""Cross-validation (`cv: k`): k ordinary fold runs on the one cached base, each fold and mean +- std."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from conftest import InterruptAt

import nbtune
import nbtune.engine.workbench as wb
from nbtune.config import RunConfig
from nbtune.data.splits import data_key, read_data
from nbtune.errors import ConfigError, DataError, RunInterrupted
from nbtune.widgets.cv_view import cv_html

FAST = {"steps": 2, "batch_size": 4, "lr": 1e-2, "metric": "none"}


def prompts(rows):
    return [r["prompt"] for r in rows]


class InterruptInFold(InterruptAt):
    """InterruptAt, in one fold's run only."""

    def __init__(self, fold: int, step: int) -> None:
        super().__init__(step)
        self.fold = fold

    def on_step(self, run, record):
        if run.config.cv_fold == self.fold:
            super().on_step(run, record)


class StopInFold(InterruptInFold):
    """The panel's Stop (run.stop()) in one fold's run."""

    def on_step(self, run, record):
        if run.config.cv_fold == self.fold and record["step"] == self.step:
            run.stop()


# ------------------------------------------------------------------ folds (no training)
def test_folds_partition_the_rows_as_evenly_as_can_be(demo_rows):
    rows = demo_rows[:11]
    for k in (2, 3, 5, 11):
        held_out = [prompts(read_data(RunConfig.parse(data=rows, cv=k, cv_fold=f))[1]) for f in range(1, k + 1)]
        assert sorted(p for fold in held_out for p in fold) == sorted(prompts(rows))  # disjoint, and all of them
        assert max(map(len, held_out)) - min(map(len, held_out)) <= 1
        train, evaluation, _ = read_data(RunConfig.parse(data=rows, cv=k, cv_fold=1))
        assert sorted(prompts(train) + prompts(evaluation)) == sorted(prompts(rows))
    first = prompts(read_data(RunConfig.parse(data=rows, cv=3, cv_fold=1))[1])
    assert prompts(read_data(RunConfig.parse(data=rows, cv=3, cv_fold=1, seed=43))[1]) != first  # seed shuffles
    assert prompts(read_data(RunConfig.parse(data=rows, cv=3))[1]) == first  # no cv_fold: fold 1 stands for all


def test_demo_data_folds_its_training_rows_not_its_held_out_split():
    from nbtune.data.demo import demo_splits

    train_rows, test_rows = demo_splits()
    train, evaluation, _ = read_data(RunConfig.parse(data="demo", cv=4, cv_fold=2))
    assert len(train) + len(evaluation) == len(train_rows)
    assert set(prompts(evaluation)) <= set(prompts(train_rows))
    assert not set(prompts(evaluation)) & set(prompts(test_rows))


def test_each_fold_tokenises_its_own_rows():
    # data named by a string is tokenised once per key: fold 2 must not be served fold 1's tokens
    keys = {data_key(RunConfig.parse(data="demo", cv=3, cv_fold=f)) for f in (1, 2, 3)}
    assert len(keys) == 3 and data_key(RunConfig.parse(data="demo")) not in keys


def test_more_folds_than_rows_is_one_line_before_any_load(tiny_model_dir, demo_rows, no_loading):
    with pytest.raises(DataError, match=r"`cv: 5` needs at least 5 rows .* it has 3") as info:
        nbtune.finetune(model=str(tiny_model_dir), data=demo_rows[:3], cv=5, **FAST)
    assert info.value.field == "cv" and "\n" not in str(info.value)
    assert not nbtune.runs


@pytest.mark.parametrize("how, match", [({"background": True}, "background"),
                                        ({"resume_from": "latest"}, "resume_from")])
def test_what_cross_validation_cannot_do_is_refused_before_any_load(tiny_model_dir, demo_rows, no_loading, how,
                                                                     match):
    with pytest.raises(ConfigError, match=match):
        nbtune.finetune(model=str(tiny_model_dir), data=demo_rows, cv=3, **FAST, **how)
    assert not nbtune.runs


# ------------------------------------------------------------------ training
def test_three_folds_are_three_ordinary_runs_on_one_loaded_base(tiny_model_dir, demo_rows, loads):
    cv = nbtune.finetune(model=str(tiny_model_dir), data=demo_rows, cv=3, name="x", output_dir="out/", **FAST)
    assert [r.name for r in cv.runs] == ["x-fold1", "x-fold2", "x-fold3"]
    assert all(nbtune.runs[r.name] is r and r.status == "finished" for r in cv.runs) and cv.complete
    assert len(loads) == 1 and len(wb.WORKBENCH.bases) == 1  # one load, one cached base, three views
    assert [str(r.saved_to) for r in cv.runs] == ["out-fold1", "out-fold2", "out-fold3"]

    held_out = []
    for run in cv.runs:
        train, evaluation, _ = read_data(run.config)
        assert sorted(prompts(train) + prompts(evaluation)) == sorted(prompts(demo_rows))
        assert [answer for _, answer in run.eval_pairs] == list(evaluation["completion"])  # what it evaluated on
        held_out += prompts(evaluation)
    assert sorted(held_out) == sorted(prompts(demo_rows))  # disjoint, and every row once

    losses = [r.metrics["eval_loss"] for r in cv.runs]
    summary = cv.summary()
    assert summary["eval_loss"]["mean"] == pytest.approx(np.mean(losses))
    assert summary["eval_loss"]["std"] == pytest.approx(np.std(losses, ddof=1))
    assert summary["eval_loss"]["folds"] == 3
    assert "train_seconds" in summary and "train_loss" in summary
    assert not {"steps", "tokens", "trainable_params", "peak_rss_mb"} & set(summary)  # counts, not results
    assert [(f["fold"], f["train_rows"] + f["eval_rows"]) for f in cv.folds] == [(1, 32), (2, 32), (3, 32)]

    text, page = repr(cv), cv_html(cv)  # the notebook's view (registered for a CrossValidation by nbtune.magics)
    assert "mean +- std" in text and "eval_loss" in text and "x-fold3" in text
    assert "<table>" in page and "<th>mean</th>" in page and "<th>std</th>" in page and "x-fold2" in page
    assert list(cv.df.index) == [1, 2, 3, "mean", "std"]
    assert cv.df.loc["std", "eval_loss"] == pytest.approx(np.std(losses, ddof=1))
    assert json.loads(json.dumps(cv.to_dict()))["summary"]["eval_loss"]["folds"] == 3
    assert [r.name for r in cv.compare().runs] == ["x-fold1", "x-fold2", "x-fold3"]


def test_a_fold_runs_yaml_repeats_that_fold(tiny_model_dir, demo_rows):
    cv = nbtune.finetune(model=str(tiny_model_dir), data=demo_rows, cv=3, name="x", **FAST)
    fold = cv.runs[1]
    text = fold.to_yaml()
    assert {k: yaml.safe_load(text)[k] for k in ("cv", "cv_fold", "name")} == {"cv": 3, "cv_fold": 2,
                                                                               "name": "x-fold2"}
    again = nbtune.finetune(text, name="again")
    assert isinstance(again, nbtune.Run) and again.eval_pairs == fold.eval_pairs  # the same held-out rows
    assert again.metrics["eval_loss"] == pytest.approx(fold.metrics["eval_loss"], rel=1e-4)


def test_an_interrupt_in_fold_2_keeps_fold_1_and_raises(tiny_model_dir, demo_rows):
    with pytest.raises(RunInterrupted, match=r"1 of 3 folds finished") as info:
        nbtune.finetune(model=str(tiny_model_dir), data=demo_rows, cv=3, name="x",
                        observers=[InterruptInFold(fold=2, step=1)], **FAST)
    assert nbtune.runs["x-fold1"].status == "finished"
    assert info.value.run is nbtune.runs["x-fold2"] and info.value.run.status == "stopped"  # kept, resumable
    assert "x-fold3" not in nbtune.runs
    partial = info.value.cross_validation
    assert [r.name for r in partial.runs] == ["x-fold1", "x-fold2"] and not partial.complete
    # the cell raised, so it returned nothing: the advice names where the cross-validation is kept
    assert nbtune.cross_validations["x"] is partial and partial.status == "stopped"
    assert "(in nbtune.runs: x-fold1); nbtune.cross_validations['x'] is what it kept" in str(info.value)


def test_a_stop_ends_the_cross_validation_after_that_fold(tiny_model_dir, demo_rows):
    cv = nbtune.finetune(model=str(tiny_model_dir), data=demo_rows, cv=3, name="x", observers=[StopInFold(2, 1)],
                         **FAST)
    assert [r.status for r in cv.runs] == ["finished", "stopped"] and not cv.complete
    assert "x-fold3" not in nbtune.runs
    assert cv.summary()["eval_loss"] == {"mean": cv.runs[0].metrics["eval_loss"], "std": None, "folds": 1}
    assert "incomplete" in repr(cv) and "incomplete" in cv_html(cv)


def test_a_base_passed_in_memory_gives_each_fold_a_fresh_view(llama_base, demo_rows):
    model, _ = llama_base
    cv = nbtune.finetune(data=demo_rows[:8], base=llama_base, cv=2, name="mine", **FAST)
    assert [r.status for r in cv.runs] == ["finished", "finished"]
    assert not hasattr(model, "peft_config") and not hasattr(model, "_nbtune_trained_by")  # the caller's is untouched
    assert cv.runs[0].model is not cv.runs[1].model and not wb.WORKBENCH.bases
