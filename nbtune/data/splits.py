"""Which rows train and which evaluate: `data`, then `eval_data`, the demo task's held-out split, or
`eval_split` of `data`, each read and format-checked before anything else happens.

With `cv: k` the rows of `data` (the demo task's training rows for 'demo') are shuffled with `seed` and
cut into k contiguous folds; fold `cv_fold` evaluates and the other k - 1 train. Same data and seed give the
same folds, so a fold run's config alone reproduces its split (nbtune/engine/experiments/crossval.py trains them all).
"""

from __future__ import annotations

from typing import Any

from nbtune.config import RunConfig
from nbtune.data.formats import detect_format
from nbtune.data.loading import is_demo, load_records, source_key
from nbtune.data.preference import check_data_for_objective
from nbtune.errors import ConfigError, DataError


def read_data(config: RunConfig) -> tuple[Any, Any, str]:
    """(train, eval or None, format) as `datasets.Dataset`s, split and format-checked."""
    train = load_records(config.data, field="data", split="train")
    fmt = detect_format(train.column_names, config.format, field="data")
    check_data_for_objective(config, fmt, train)
    demo = is_demo(config.data)
    if config.cv:  # config.py refused eval_data and eval_split beside it
        train, evaluation = fold_split(train, config)
        _check_scorable(config, evaluation, fmt)
        return train, evaluation, fmt
    if config.eval_split > 0 and (config.eval_data is not None or demo):
        raise ConfigError("`eval_split` only applies when there is no `eval_data` (the demo task brings its "
                          "own held-out split); remove one of them.", field="eval_split")
    if config.eval_data is not None:
        evaluation = load_records(config.eval_data, field="eval_data", split="test")
        detect_format(evaluation.column_names, fmt, field="eval_data")
    elif demo:
        evaluation = load_records(config.data, field="data", split="test")
    elif config.eval_split > 0:
        held_out = round(len(train) * config.eval_split)
        if held_out < 1 or held_out >= len(train):
            raise DataError(f"`eval_split: {config.eval_split}` of {len(train)} examples holds out {held_out}; "
                            "it needs at least one for each side. Give more data or `eval_data`.",
                            field="eval_split")
        parts = train.train_test_split(test_size=held_out, seed=config.seed)
        train, evaluation = parts["train"], parts["test"]
    else:
        evaluation = None
    _check_scorable(config, evaluation, fmt)
    if evaluation is not None:
        check_data_for_objective(config, fmt, evaluation, field="eval_data")
    return train, evaluation, fmt


def fold_split(rows: Any, config: RunConfig) -> tuple[Any, Any]:
    """(train, eval) of fold `config.cv_fold` of `config.cv`; without `cv_fold` (a whole cross-validation's
    config, which nbtune.finetune trains fold by fold) the first fold stands for all of them: the checks a
    fold's data passes, the sizes a dry run reports. More folds than rows: a `DataError` naming `cv`."""
    import numpy as np

    folds, n = config.cv, len(rows)
    if folds > n:
        fewer = f" or fewer folds (cv: {n} at most)" if n >= 2 else ""
        raise DataError(f"`cv: {folds}` needs at least {folds} rows of `data`, one per fold, and it has {n}; give "
                        f"more rows{fewer}.", field="cv")
    start, end = fold_bounds(n, folds, config.cv_fold or 1)
    # numpy's generator, as `Dataset.shuffle(seed=...)` draws it: the folds do not depend on the datasets version
    order = np.random.default_rng(config.seed).permutation(n)
    held_out = np.sort(order[start:end])
    kept = np.sort(np.concatenate([order[:start], order[end:]]))
    return rows.select(kept), rows.select(held_out)


def fold_bounds(n: int, folds: int, fold: int) -> tuple[int, int]:
    """Where fold `fold` (1-based) of `folds` starts and ends among `n` shuffled rows: contiguous and as even
    as can be, the first `n % folds` folds one row longer (as `Dataset.shard(contiguous=True)` cuts)."""
    size, extra = divmod(n, folds)
    start = size * (fold - 1) + min(fold - 1, extra)
    return start, start + size + (1 if fold - 1 < extra else 0)


def _check_scorable(config: RunConfig, evaluation: Any, fmt: str) -> None:
    """Metrics and loss evaluation need eval rows; generation metrics need an answer in each of them."""
    chosen = config.metric not in ("auto", "none")
    if evaluation is None and (chosen or config.eval_steps):
        key = "metric" if chosen else "eval_steps"
        raise ConfigError(f"`{key}` needs evaluation data: set `eval_data` or `eval_split`.", field=key)
    if chosen and fmt == "text" and _generation_metrics(config.metric):
        raise DataError("`metric` scores generated answers against the eval data's answers, and this data is "
                        "plain `text` with no answer column: give prompt/completion (or chat, or alpaca) rows, or "
                        "set `metric: [eval_loss]`.", field="metric")


def _generation_metrics(spec: Any) -> list[Any]:
    return [m for m in (spec if isinstance(spec, list) else [spec]) if m not in ("eval_loss", "perplexity")]


def data_key(config: RunConfig) -> tuple[Any, ...] | None:
    """What identifies this run's data for the tokenising cache; None when the data lives in memory."""
    train, evaluation = source_key(config.data), source_key(config.eval_data)
    if train is None or (config.eval_data is not None and evaluation is None):
        return None
    # the fold settings pick the rows: fold 1's tokenised rows must not stand in for fold 2's
    return (train, evaluation, config.eval_split, config.seed, config.cv, config.cv_fold)
