"""Which rows train and which evaluate: `data`, then `eval_data`, the demo task's held-out split, or
`eval_split` of `data`, each read and format-checked before anything else happens."""

from __future__ import annotations

from typing import Any

from nbtune.config import RunConfig
from nbtune.data.formats import detect_format
from nbtune.data.loading import load_records, source_key
from nbtune.errors import ConfigError, DataError


def read_data(config: RunConfig) -> tuple[Any, Any, str]:
    """(train, eval or None, format) as `datasets.Dataset`s, split and format-checked."""
    train = load_records(config.data, field="data", split="train")
    fmt = detect_format(train.column_names, config.format, field="data")
    is_demo = isinstance(config.data, str) and config.data == "demo"
    if config.eval_split > 0 and (config.eval_data is not None or is_demo):
        raise ConfigError("`eval_split` only applies when there is no `eval_data` (the demo task brings its "
                          "own held-out split); remove one of them.", field="eval_split")
    if config.eval_data is not None:
        evaluation = load_records(config.eval_data, field="eval_data", split="test")
        detect_format(evaluation.column_names, fmt, field="eval_data")
    elif is_demo:
        evaluation = load_records("demo", field="data", split="test")
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
    if evaluation is None and (config.metric == "exact_match" or config.eval_steps):
        key = "metric" if config.metric == "exact_match" else "eval_steps"
        raise ConfigError(f"`{key}` needs evaluation data: set `eval_data` or `eval_split`.", field=key)
    return train, evaluation, fmt


def data_key(config: RunConfig) -> tuple[Any, ...] | None:
    """What identifies this run's data for the tokenising cache; None when the data lives in memory."""
    train, evaluation = source_key(config.data), source_key(config.eval_data)
    if train is None or (config.eval_data is not None and evaluation is None):
        return None
    return (train, evaluation, config.eval_split, config.seed)
