"""`RunConfig.to_text`: the one writer of configs as YAML (the picker's cell, `run.to_yaml()`, launch
files). What it writes, `RunConfig.parse` reads back into an equal config; `omit` leaves out what it names."""

from __future__ import annotations

import dataclasses
import doctest

import pytest

import nbtune.config.text
from nbtune import ConfigError, RunConfig
from nbtune.config import load_yaml

ROWS = [{"prompt": "2+2=", "completion": "4"}, {"prompt": "3+3=", "completion": "6"}]

CONFIGS = {
    "lora with options": {"method": "lora", "r": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"],
                          "rslora": True, "steps": 5},
    "lora by derived epochs": {"method": "lora", "lr": 1e-3, "weight_decay": 0.1},
    "prompt method": {"method": "prefix", "num_virtual_tokens": 10, "prefix_projection": False, "epochs": 2},
    "full": {"method": "full", "steps": 3, "precision": "fp32", "save": False, "metric": "none"},
    "qlora": {"method": "qlora", "steps": 2, "max_length": 128},
    "peft passthrough": {"method": "peft", "peft_type": "lokr", "peft_args": {"r": 4, "alpha": 8}, "steps": 1},
    "in-memory rows": {"data": ROWS, "eval_data": ROWS[:1], "steps": 1},
}


@pytest.mark.parametrize("raw", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("omit", [("derived",), ("defaults", "derived")], ids=["plain", "short"])
def test_parse_reads_to_text_back_into_an_equal_config(raw, omit):
    config = RunConfig.parse({"name": "again", **raw})
    again = RunConfig.parse(config.to_text(omit=omit))
    assert again == config
    assert again.derived == config.derived  # what was derived is derived again, not pinned


def test_a_dataframe_is_written_as_its_rows_and_read_back_as_them():
    pd = pytest.importorskip("pandas")

    config = RunConfig.parse({"name": "framed", "data": pd.DataFrame(ROWS), "steps": 1})
    text = config.to_text()
    assert "DataFrame" not in text and load_yaml(text)["data"] == ROWS
    again = RunConfig.parse(text)
    assert again.data == ROWS
    assert again == dataclasses.replace(config, data=ROWS)


def test_a_datasets_dataset_is_written_as_its_rows():
    datasets = pytest.importorskip("datasets")

    config = RunConfig.parse({"name": "dataset", "eval_data": datasets.Dataset.from_list(ROWS), "steps": 1})
    assert RunConfig.parse(config.to_text()).eval_data == ROWS


def test_by_default_every_set_value_is_written_in_field_order_and_derived_ones_are_not():
    config = RunConfig.parse({"name": "plain", "method": "lora", "r": 4, "steps": 2})
    keys = list(load_yaml(config.to_text()))
    expected = [k for k, v in config.to_dict().items() if v is not None and k not in config.derived]
    assert keys == expected  # what `run.to_yaml()` and launch files have always written
    assert keys[:3] == ["name", "model", "method"] and keys[-1] == "init"  # method options last
    assert {"lr", "quantization", "precision", "dtype", "epochs"}.isdisjoint(keys)


def test_a_derived_value_changed_since_is_written():
    config = RunConfig.parse({"name": "edited", "steps": 2}).with_changes(lr=1e-3)  # the user's value now
    assert load_yaml(config.to_text())["lr"] == 1e-3
    assert RunConfig.parse(config.to_text()).lr == 1e-3


def test_omit_defaults_keeps_the_method_and_what_differs():
    config = RunConfig.parse({"name": "short", "method": "lora", "r": 16, "steps": 30, "batch_size": 8})
    assert load_yaml(config.to_text(omit=("defaults", "derived"))) == {
        "name": "short", "method": "lora", "steps": 30, "r": 16}
    with_derived = load_yaml(config.to_text(omit="defaults"))  # a single word is one word, not letters
    assert with_derived["lr"] == config.lr and "batch_size" not in with_derived


def test_omit_names_keys_and_refuses_unknown_words_with_a_suggestion():
    config = RunConfig.parse({"name": "named", "method": "ia3", "steps": 1})
    text = config.to_text(omit=("name", "defaults", "derived", "target_modules"))
    assert load_yaml(text) == {"method": "ia3", "steps": 1}
    with pytest.raises(ConfigError, match=r"`omit` names `default`.*Did you mean `defaults`\?") as info:
        config.to_text(omit=("default",))
    assert info.value.field == "omit"
    with pytest.raises(ConfigError, match="`r`"):  # a lora option, not one of ia3's
        config.to_text(omit=("r",))


def test_the_modules_example_runs():  # the `builtins._` doctest leaves goes in conftest's _no_stray_underscore
    result = doctest.testmod(nbtune.config.text)
    assert result.attempted and not result.failed
