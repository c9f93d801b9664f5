"""Data: loading every input kind, format detection, message conversion and answer-only tokenisation."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from nbtune import DataError
from nbtune.data import detect_format, load_records, prepare_tokenizer, prompts_and_answers, to_messages
from nbtune.data.demo import TEST_SIZE, TRAIN_SIZE
from nbtune.data.tokenize import FALLBACK_CHAT_TEMPLATE, IGNORE_INDEX, encode, render, tokenize_dataset

ROWS = [
    {"prompt": "Convert this date to ISO format (YYYY-MM-DD): 3 Aug 1987", "completion": "1987-08-03"},
    {"prompt": "Convert this date to ISO format (YYYY-MM-DD): May 1, 2001", "completion": "2001-05-01"},
    {"prompt": "Convert this date to ISO format (YYYY-MM-DD): the 4th of July, 1976", "completion": "1976-07-04"},
]


# File rows whose values no reader mistakes for another type (see test_iso_date_answers_stay_strings).
FILE_ROWS = [
    {"prompt": "Say hello.", "completion": "Hello world."},
    {"prompt": "What is the answer?", "completion": "forty-two"},
    {"prompt": "Spell 3 Aug 1987.", "completion": "the third of August"},
]


def _pairs(dataset) -> list[tuple[str, str]]:
    return [(row["prompt"], row["completion"]) for row in dataset]


# ---------------------------------------------------------------- the demo task


def test_demo_train_split():
    train = load_records("demo")
    assert isinstance(train, datasets.Dataset)
    assert len(train) == TRAIN_SIZE == 512
    assert set(train.column_names) == {"prompt", "completion"}
    assert all(row["prompt"].startswith("Convert this date to ISO format (YYYY-MM-DD): ") for row in train)


def test_demo_test_split_is_disjoint_from_train():
    train = load_records("demo")
    test = load_records("demo", split="test")
    assert len(test) == TEST_SIZE == 64
    train_answers = {row["completion"] for row in train}
    test_answers = {row["completion"] for row in test}
    assert len(test_answers) == 64  # no date repeats inside the split
    assert not train_answers & test_answers


def test_demo_is_deterministic():
    assert _pairs(load_records("demo")) == _pairs(load_records("demo"))
    assert _pairs(load_records("demo", split="test")) == _pairs(load_records("demo", split="test"))


def test_demo_answers_are_iso_dates():
    import datetime as dt

    for row in load_records("demo", split="test"):
        assert dt.date.fromisoformat(row["completion"]).isoformat() == row["completion"]


# ---------------------------------------------------------------- files


def _write(path: Path, kind: str, rows: list[dict] = FILE_ROWS) -> None:
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif kind == "json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif kind == "csv":
        import pandas as pd

        pd.DataFrame(rows).to_csv(path, index=False)
    elif kind == "parquet":
        import pandas as pd

        pd.DataFrame(rows).to_parquet(path, index=False)


@pytest.mark.parametrize(("kind", "filename"), [
    ("jsonl", "rows.jsonl"),
    ("json", "rows.json"),
    ("csv", "rows.csv"),
    ("parquet", "rows.parquet"),
    ("jsonl", "ROWS.JSONL"),
], ids=["jsonl", "json", "csv", "parquet", "upper-suffix"])
def test_load_file(tmp_path, kind, filename):
    path = tmp_path / filename
    _write(path, kind)
    dataset = load_records(str(path))
    assert isinstance(dataset, datasets.Dataset)
    assert _pairs(dataset) == [(r["prompt"], r["completion"]) for r in FILE_ROWS]


@pytest.mark.parametrize("kind", ["jsonl", "json"])
def test_iso_date_answers_stay_strings(tmp_path, kind):
    # The demo task itself, exported to a file and loaded back, must train on the same answers.
    path = tmp_path / f"rows.{kind}"
    _write(path, kind, ROWS)
    dataset = load_records(str(path))
    assert [to_messages(row, "prompt_completion")[-1]["content"] for row in dataset] == [
        r["completion"] for r in ROWS]


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_iso_date_answers_stay_strings_in_tables(tmp_path, kind):
    path = tmp_path / f"rows.{kind}"
    _write(path, kind, ROWS)
    dataset = load_records(str(path))
    assert [to_messages(row, "prompt_completion")[-1]["content"] for row in dataset] == [
        r["completion"] for r in ROWS]


def test_csv_cells_stay_the_text_they_are(tmp_path):
    path = tmp_path / "codes.csv"
    path.write_text('prompt,completion\ncode of a,007\nprice of b,1.50\n"empty, on purpose",\n', encoding="utf-8")
    assert _pairs(load_records(str(path))) == [("code of a", "007"), ("price of b", "1.50"),
                                               ("empty, on purpose", "")]


def test_a_bad_jsonl_line_is_named_by_its_line_in_the_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in FILE_ROWS) + "{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"at line 4 of the file"):
        load_records(str(path))


def test_load_file_relative_to_cwd_and_as_path():
    _write(Path("rows.jsonl"), "jsonl")
    assert len(load_records("rows.jsonl")) == 3
    assert len(load_records(Path("rows.jsonl"))) == 3


# ---------------------------------------------------------------- in-memory data


def test_load_list_of_dicts():
    dataset = load_records(ROWS)
    assert _pairs(dataset) == [(r["prompt"], r["completion"]) for r in ROWS]


def test_load_dataframe():
    import pandas as pd

    frame = pd.DataFrame(ROWS, index=[10, 20, 30])
    dataset = load_records(frame)
    assert _pairs(dataset) == [(r["prompt"], r["completion"]) for r in ROWS]
    assert set(dataset.column_names) == {"prompt", "completion"}  # the index does not become a column


def test_load_dataset_is_returned_as_is():
    dataset = datasets.Dataset.from_list(ROWS)
    assert load_records(dataset) is dataset


def test_load_dataset_dict_uses_train():
    train = datasets.Dataset.from_list(ROWS)
    other = datasets.Dataset.from_list(ROWS[:1])
    loaded = load_records(datasets.DatasetDict({"test": other, "train": train}))
    assert len(loaded) == 3
    assert _pairs(loaded) == _pairs(train)


# ---------------------------------------------------------------- loading errors


def _not_data():
    return object()


LOAD_ERRORS = [
    ("missing-file", lambda: "nope.jsonl", "nope.jsonl"),
    ("missing-parquet", lambda: "sub/dir/nope.parquet", "does not exist"),
    ("empty-list", lambda: [], "empty"),
    ("list-of-strings", lambda: ["a", "b"], "item 0"),
    ("list-with-one-bad-item", lambda: [{"prompt": "a", "completion": "b"}, 3], "item 1"),
    ("empty-dataframe", lambda: __import__("pandas").DataFrame(), "no examples"),
    ("dataframe-without-rows", lambda: __import__("pandas").DataFrame({"prompt": [], "completion": []}),
     "no examples"),
    ("empty-dataset", lambda: datasets.Dataset.from_dict({"prompt": [], "completion": []}), "no examples"),
    ("dataset-dict-without-train", lambda: datasets.DatasetDict({"validation": datasets.Dataset.from_list(ROWS)}),
     "train"),
    ("hub-name-offline", lambda: "someone/no-such-dataset-xyz", "someone/no-such-dataset-xyz"),
    ("int", lambda: 42, "int"),
    ("dict", lambda: {"prompt": ["a"], "completion": ["b"]}, "dict"),
    ("object", _not_data, "object"),
]


@pytest.mark.parametrize("field", ["data", "eval_data"])
@pytest.mark.parametrize(("make", "needle"), [c[1:] for c in LOAD_ERRORS], ids=[c[0] for c in LOAD_ERRORS])
def test_load_errors_name_the_field(make, needle, field):
    with pytest.raises(DataError) as info:
        load_records(make(), field=field)
    message = str(info.value)
    assert info.value.field == field
    assert f"`{field}`" in message
    assert needle in message
    assert "\n" not in message


def test_existing_file_with_unsupported_suffix(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("prompt: a\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"\.txt") as info:
        load_records(str(path), field="eval_data")
    assert info.value.field == "eval_data"
    assert ".jsonl" in str(info.value)  # says what works


def test_unreadable_file_is_a_data_error(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.jsonl") as info:
        load_records(str(path))
    assert info.value.field == "data"
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- format detection


@pytest.mark.parametrize(("columns", "expected"), [
    (["messages"], "chat"),
    (["conversations", "id"], "chat"),
    (["instruction", "output"], "alpaca"),
    (["instruction", "input", "output", "system"], "alpaca"),
    (["prompt", "completion"], "prompt_completion"),
    (["prompt", "response"], "prompt_completion"),
    (["question", "answer"], "prompt_completion"),
    (["text"], "text"),
    (["text", "meta"], "text"),
    (["messages", "text"], "chat"),
    (["instruction", "output", "text"], "alpaca"),
], ids=["messages", "conversations", "alpaca", "alpaca-full", "prompt-completion", "prompt-response",
        "question-answer", "text", "text-extra", "chat-beats-text", "alpaca-beats-text"])
def test_detect_format(columns, expected):
    assert detect_format(columns) == expected


@pytest.mark.parametrize("field", ["data", "eval_data"])
def test_detect_unknown_columns(field):
    with pytest.raises(DataError) as info:
        detect_format(["foo", "bar_baz"], field=field)
    message = str(info.value)
    assert info.value.field == field
    assert "foo" in message and "bar_baz" in message
    assert "\n" not in message


@pytest.mark.parametrize(("columns", "declared"), [
    (["messages"], "chat"),
    (["conversations"], "chat"),
    (["instruction", "output"], "alpaca"),
    (["prompt", "completion"], "prompt_completion"),
    (["question", "answer"], "prompt_completion"),
    (["prompt", "completion", "text"], "text"),
], ids=["chat", "chat-conversations", "alpaca", "prompt-completion", "question-answer", "text-forced"])
def test_declared_format_accepted(columns, declared):
    assert detect_format(columns, declared) == declared


@pytest.mark.parametrize(("columns", "declared", "missing"), [
    (["prompt", "completion"], "chat", "messages"),
    (["instruction"], "alpaca", "output"),
    (["prompt", "completion"], "text", "text"),
    (["text"], "prompt_completion", "prompt"),
    (["prompt"], "prompt_completion", "completion"),
], ids=["chat", "alpaca", "text", "prompt-completion", "prompt-only"])
def test_declared_format_missing_columns(columns, declared, missing):
    with pytest.raises(DataError) as info:
        detect_format(columns, declared)
    message = str(info.value)
    assert info.value.field == "format"
    assert f"`format: {declared}`" in message
    assert missing in message
    assert "\n" not in message


# ---------------------------------------------------------------- to_messages


def test_alpaca_without_input():
    messages = to_messages({"instruction": "Say hi.", "input": "", "output": "hi"}, "alpaca")
    assert messages == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]


def test_alpaca_with_input_and_system():
    example = {"instruction": "Translate.", "input": "Bonjour", "output": "Hello", "system": "Be terse."}
    assert to_messages(example, "alpaca") == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Translate.\n\nBonjour"},
        {"role": "assistant", "content": "Hello"},
    ]


def test_alpaca_with_null_input():
    messages = to_messages({"instruction": "Go.", "input": None, "output": "ok"}, "alpaca")
    assert messages[0] == {"role": "user", "content": "Go."}


def test_sharegpt_conversion():
    example = {"conversations": [
        {"from": "system", "value": "S"},
        {"from": "human", "value": "Q1"},
        {"from": "gpt", "value": "A1"},
        {"from": "user", "value": "Q2"},
        {"from": "model", "value": "A2"},
    ]}
    assert to_messages(example, "chat") == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"},
    ]


def test_chat_messages_pass_through():
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert to_messages({"messages": messages}, "chat") == messages


@pytest.mark.parametrize(("example", "pair"), [
    ({"prompt": "P", "completion": "C"}, ("P", "C")),
    ({"prompt": "P", "response": "R"}, ("P", "R")),
    ({"question": "Q", "answer": 42}, ("Q", "42")),
], ids=["completion", "response", "question-answer"])
def test_prompt_completion_messages(example, pair):
    assert to_messages(example, "prompt_completion") == [
        {"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]


@pytest.mark.parametrize("bad", [
    {"role": "wizard", "content": "x"},
    {"role": "user"},
    "just a string",
], ids=["unknown-role", "no-content", "not-a-dict"])
def test_bad_chat_message(bad):
    with pytest.raises(DataError) as info:
        to_messages({"messages": [bad]}, "chat")
    assert info.value.field == "data"
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- tokenisation


def _labelled_segments(tokenizer, ids, labels) -> list[str]:
    """Decoded runs of consecutive labelled tokens."""
    segments, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            segments.append(tokenizer.decode(current))
            current = []
    if current:
        segments.append(tokenizer.decode(current))
    return segments


def _encode(example, tokenizer, fmt, *, max_length=512, train_on_prompt=False):
    return encode(example, tokenizer=tokenizer, fmt=fmt, max_length=max_length, train_on_prompt=train_on_prompt)


def test_answer_only_labels(chat_tokenizer):
    out = _encode(ROWS[0], chat_tokenizer, "prompt_completion")
    ids, labels = out["input_ids"], out["labels"]
    assert len(ids) == len(labels) == len(out["attention_mask"]) == out["length"]
    assert chat_tokenizer.decode(ids) == (f"<|im_start|>user\n{ROWS[0]['prompt']}<|im_end|>\n"
                                          f"<|im_start|>assistant\n{ROWS[0]['completion']}<|im_end|>\n")
    assert _labelled_segments(chat_tokenizer, ids, labels) == ["1987-08-03<|im_end|>\n"]
    # every prompt token is masked: the labels are one run at the end
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert all(label == IGNORE_INDEX for label in labels[:first])
    assert labels[first:] == ids[first:]
    assert chat_tokenizer.decode(ids[:first]).endswith("<|im_start|>assistant\n")


def test_train_on_prompt_labels_everything(chat_tokenizer):
    out = _encode(ROWS[0], chat_tokenizer, "prompt_completion", train_on_prompt=True)
    assert out["labels"] == out["input_ids"]


def test_multi_turn_labels_every_assistant_turn_only(chat_tokenizer):
    example = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello world."},
        {"role": "assistant", "content": "1987-08-03"},
        {"role": "user", "content": "What is the answer?"},
        {"role": "assistant", "content": "2001-01-01"},
    ]}
    out = _encode(example, chat_tokenizer, "chat")
    segments = _labelled_segments(chat_tokenizer, out["input_ids"], out["labels"])
    assert segments == ["1987-08-03<|im_end|>\n", "2001-01-01<|im_end|>\n"]
    assert not any("Hello" in s or "answer?" in s or "brief" in s for s in segments)


def test_alpaca_labels_the_output(chat_tokenizer):
    example = {"instruction": "Convert this date.", "input": "3 Aug 1987", "output": "1987-08-03"}
    out = _encode(example, chat_tokenizer, "alpaca")
    assert _labelled_segments(chat_tokenizer, out["input_ids"], out["labels"]) == ["1987-08-03<|im_end|>\n"]
    assert "Convert this date.\n\n3 Aug 1987" in chat_tokenizer.decode(out["input_ids"])


def test_text_format_labels_everything_and_appends_eos(chat_tokenizer):
    out = _encode({"text": "Hello world."}, chat_tokenizer, "text")
    assert out["labels"] == out["input_ids"]
    assert out["input_ids"][-1] == chat_tokenizer.eos_token_id
    assert chat_tokenizer.decode(out["input_ids"]) == "Hello world." + chat_tokenizer.eos_token
    assert out["length"] == len(out["input_ids"])


def test_tokenize_dataset_length_column(chat_tokenizer):
    encoded = tokenize_dataset(datasets.Dataset.from_list(ROWS), chat_tokenizer, fmt="prompt_completion",
                               max_length=512, train_on_prompt=False)
    assert len(encoded) == len(ROWS)
    assert set(encoded.column_names) == {"input_ids", "attention_mask", "labels", "length"}
    for row in encoded:
        assert row["length"] == len(row["input_ids"]) == len(row["labels"])
    answers = [_labelled_segments(chat_tokenizer, r["input_ids"], r["labels"]) for r in encoded]
    assert answers == [[r["completion"] + "<|im_end|>\n"] for r in ROWS]


def test_tokenize_dataset_text(chat_tokenizer):
    data = datasets.Dataset.from_list([{"text": "Hello world."}, {"text": "What is the answer?"}])
    encoded = tokenize_dataset(data, chat_tokenizer, fmt="text", max_length=512, train_on_prompt=False)
    assert [r["labels"] for r in encoded] == [r["input_ids"] for r in encoded]
    assert all(r["input_ids"][-1] == chat_tokenizer.eos_token_id for r in encoded)


def test_truncation_respects_max_length(chat_tokenizer):
    encoded = tokenize_dataset(datasets.Dataset.from_list(ROWS), chat_tokenizer, fmt="prompt_completion",
                               max_length=512, train_on_prompt=True)
    short = min(r["length"] for r in encoded) - 3
    cut = tokenize_dataset(datasets.Dataset.from_list(ROWS), chat_tokenizer, fmt="prompt_completion",
                           max_length=short, train_on_prompt=True)
    assert len(cut) == len(ROWS)
    assert all(r["length"] == short for r in cut)


@pytest.mark.parametrize("field", ["data", "eval_data"])
def test_truncation_that_cuts_every_answer(chat_tokenizer, field):
    with pytest.raises(DataError) as info:
        tokenize_dataset(datasets.Dataset.from_list(ROWS), chat_tokenizer, fmt="prompt_completion",
                         max_length=10, train_on_prompt=False, field=field)
    message = str(info.value)
    assert info.value.field == "max_length"
    assert f"`{field}`" in message
    assert "max_length=10" in message
    assert "\n" not in message


def test_examples_whose_answer_is_cut_off_are_dropped(chat_tokenizer):
    long_prompt = "Hello world. " * 40 + "What is the answer?"
    rows = [ROWS[0], {"prompt": long_prompt, "completion": "2001-01-01"}, ROWS[1]]
    encoded = tokenize_dataset(datasets.Dataset.from_list(rows), chat_tokenizer, fmt="prompt_completion",
                               max_length=64, train_on_prompt=False)
    assert len(encoded) == 2
    answers = [_labelled_segments(chat_tokenizer, r["input_ids"], r["labels"]) for r in encoded]
    assert answers == [[ROWS[0]["completion"] + "<|im_end|>\n"], [ROWS[1]["completion"] + "<|im_end|>\n"]]


def test_slow_tokenizer_is_refused(chat_tokenizer, monkeypatch):
    monkeypatch.setattr(type(chat_tokenizer), "is_fast", property(lambda self: False))
    with pytest.raises(DataError, match="fast") as info:
        tokenize_dataset(datasets.Dataset.from_list(ROWS), chat_tokenizer, fmt="prompt_completion",
                         max_length=64, train_on_prompt=False, field="eval_data")
    assert info.value.field == "eval_data"


# ---------------------------------------------------------------- tokenizers without a template


def test_prepare_tokenizer_adds_pad_and_template(plain_tokenizer):
    assert plain_tokenizer.pad_token is None
    assert not plain_tokenizer.chat_template
    returned = prepare_tokenizer(plain_tokenizer)
    assert returned is plain_tokenizer
    assert plain_tokenizer.pad_token == plain_tokenizer.eos_token == "<|endoftext|>"
    assert plain_tokenizer.chat_template == FALLBACK_CHAT_TEMPLATE


def test_prepare_tokenizer_keeps_existing_template_and_pad(chat_tokenizer):
    template, pad = chat_tokenizer.chat_template, chat_tokenizer.pad_token
    prepare_tokenizer(chat_tokenizer)
    assert chat_tokenizer.chat_template == template
    assert chat_tokenizer.pad_token == pad


def test_fallback_template_puts_eos_right_after_the_answer(plain_tokenizer):
    prepare_tokenizer(plain_tokenizer)
    messages = to_messages({"prompt": "When?", "completion": "1987-08-03"}, "prompt_completion")
    text = render(plain_tokenizer, messages)
    assert "1987-08-03" + plain_tokenizer.eos_token in text
    assert text.index(plain_tokenizer.eos_token) == text.index("1987-08-03") + len("1987-08-03")
    assert text.startswith("User: When?\n")
    assert render(plain_tokenizer, messages[:1], generation_prompt=True) == "User: When?\nAssistant:"


def test_fallback_template_answer_only_labels(plain_tokenizer):
    prepare_tokenizer(plain_tokenizer)
    out = _encode(ROWS[0], plain_tokenizer, "prompt_completion")
    segments = _labelled_segments(plain_tokenizer, out["input_ids"], out["labels"])
    assert len(segments) == 1
    assert segments[0].strip() == "1987-08-03<|endoftext|>"
    assert plain_tokenizer.eos_token_id in out["input_ids"]


# ---------------------------------------------------------------- prompts_and_answers


def test_prompts_and_answers_prompt_completion():
    pairs = prompts_and_answers(datasets.Dataset.from_list(ROWS), "prompt_completion")
    assert pairs == [([{"role": "user", "content": r["prompt"]}], r["completion"]) for r in ROWS]


def test_prompts_and_answers_keeps_earlier_turns():
    messages = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"},
    ]
    pairs = prompts_and_answers([{"messages": messages}], "chat")
    assert pairs == [(messages[:3], "A2")]


def test_prompts_and_answers_skips_conversations_not_ending_with_an_answer():
    messages = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                {"role": "user", "content": "Q2"}]
    assert prompts_and_answers([{"messages": messages}], "chat") == []


# ---- rows a user's data really has: empty cells, refusing templates, assistant-first chats, drops
def test_rows_with_empty_answers_or_messages_are_refused_not_trained_as_none(chat_tokenizer):
    import nbtune.data.tokenize as tk
    from nbtune.errors import DataError

    bad_rows = [({"prompt": "p", "completion": None}, "prompt_completion", "completion"),
                ({"instruction": "i", "output": None}, "alpaca", "output"),
                ({"messages": None}, "chat", "no messages"),
                ({"text": None}, "text", "text")]
    for row, fmt, match in bad_rows:
        with pytest.raises(DataError, match=match):
            tk.encode(row, tokenizer=chat_tokenizer, fmt=fmt, max_length=64, train_on_prompt=False)


def test_a_chat_template_that_refuses_a_conversation_is_a_data_error(chat_tokenizer):
    import nbtune.data.tokenize as tk
    from nbtune.errors import DataError

    chat_tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}")
    row = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                        {"role": "assistant", "content": "a"}]}
    with pytest.raises(DataError, match="System role not supported"):
        tk.encode(row, tokenizer=chat_tokenizer, fmt="chat", max_length=64, train_on_prompt=False)


def test_an_assistant_first_chat_does_not_train_on_a_default_system_prompt(chat_tokenizer):
    import nbtune.data.tokenize as tk

    chat_tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nDefault persona<|im_end|>\n{% endif %}"
        + chat_tokenizer.chat_template)
    row = {"messages": [{"role": "assistant", "content": "Hello world."}, {"role": "user", "content": "u"}]}
    out = tk.encode(row, tokenizer=chat_tokenizer, fmt="chat", max_length=128, train_on_prompt=False)
    learned = chat_tokenizer.decode([t for t, lab in zip(out["input_ids"], out["labels"], strict=True)
                                     if lab != tk.IGNORE_INDEX])
    assert "Hello world." in learned and "Default persona" not in learned


def test_dropped_examples_are_reported(chat_tokenizer):
    import datasets

    import nbtune.data.tokenize as tk

    rows = [{"prompt": "short", "completion": "ok"}, {"prompt": "word " * 200, "completion": "cut off"}]
    with pytest.warns(UserWarning, match="1 of 2 examples"):
        out = tk.tokenize_dataset(datasets.Dataset.from_list(rows), chat_tokenizer, fmt="prompt_completion",
                                  max_length=64, train_on_prompt=False)
    assert len(out) == 1


def test_tokenised_data_is_reused_for_an_unchanged_file_and_redone_when_it_changes(tmp_path, chat_tokenizer):
    import json
    import os

    from nbtune.data.loading import load_records, source_key
    from nbtune.data.tokenize import tokenize_dataset

    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"p{i}", "completion": "c"}) for i in range(4)))

    def tokenised():
        return tokenize_dataset(load_records(str(path)), chat_tokenizer, fmt="prompt_completion", max_length=64,
                                train_on_prompt=False, cache_key=source_key(str(path)))

    first = tokenised()
    assert tokenised() is first
    path.write_text(path.read_text() + "\n" + json.dumps({"prompt": "new", "completion": "row"}))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    changed = tokenised()
    assert changed is not first and len(changed) == 5
    assert source_key([{"prompt": "in memory"}]) is None  # no cache for data nbtune cannot identify


def test_columns_only_later_rows_have_are_kept(tmp_path):
    rows = [{"instruction": "Add", "output": "4"},
            {"instruction": "Translate", "input": "bonjour", "output": "hello", "system": "Be terse"}]
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for source in (rows, str(path)):
        second = load_records(source)[1]
        assert to_messages(second, "alpaca") == [{"role": "system", "content": "Be terse"},
                                                {"role": "user", "content": "Translate\n\nbonjour"},
                                                {"role": "assistant", "content": "hello"}]


def test_rows_of_mixed_shapes_and_chats_as_text_are_named():
    mixed = load_records([{"prompt": "a", "completion": "b"},
                          {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}])
    with pytest.raises(DataError, match="it has prompt, completion instead: give every row the same shape"):
        to_messages(mixed[0], detect_format(mixed.column_names))
    with pytest.raises(DataError, match=r"must be a list of \{role, content\} dicts, got text"):
        to_messages({"messages": "hello"}, "chat")


@pytest.mark.parametrize("answer", ["", "   "])
def test_an_empty_answer_is_named_not_trained(answer):
    with pytest.raises(DataError, match="has an empty `completion`"):
        to_messages({"prompt": "a", "completion": answer}, "prompt_completion")


# ---------------------------------------------------------------- column names as people write them

CASED = [
    ([{"Question": "What is 2+2?", "Answer": "4"}], ["question", "answer"], "prompt_completion"),
    ([{"Prompt": "What is 2+2?", "Completion": "4"}], ["prompt", "completion"], "prompt_completion"),
    ([{"PROMPT": "What is 2+2?", "Response": "4"}], ["prompt", "response"], "prompt_completion"),
    ([{"Instruction": "Add", "Input": "2+2", "Output": "4"}], ["instruction", "input", "output"], "alpaca"),
    ([{"Messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}],
     ["messages"], "chat"),
    ([{" question ": "What is 2+2?", "answer": "4", "Id": 7}], ["question", "answer", "Id"], "prompt_completion"),
]


@pytest.mark.parametrize(("rows", "columns", "fmt"), CASED, ids=["Question", "Prompt", "PROMPT-Response",
                                                                 "Instruction", "Messages", "spaces"])
@pytest.mark.parametrize("kind", ["list", "dataframe", "csv-or-jsonl"])
def test_columns_match_whatever_their_case(rows, columns, fmt, kind, tmp_path, chat_tokenizer):
    import pandas as pd

    if kind == "dataframe":
        source = pd.DataFrame(rows)
    elif kind == "list":
        source = rows
    else:  # a chat cannot sit in a CSV cell
        source = tmp_path / ("rows.jsonl" if fmt == "chat" else "rows.csv")
        if fmt == "chat":
            source.write_text(json.dumps(rows[0]) + "\n", encoding="utf-8")
        else:
            pd.DataFrame(rows).to_csv(source, index=False)
    dataset = load_records(source)
    assert dataset.column_names == columns
    assert detect_format(dataset.column_names) == fmt
    messages = to_messages(dataset[0], fmt)
    assert messages[-1] == {"role": "assistant", "content": "4"} and "2+2" in messages[-2]["content"]
    trained = tokenize_dataset(dataset, chat_tokenizer, fmt=fmt, max_length=64, train_on_prompt=False)
    assert len(trained) == 1 and any(label != IGNORE_INDEX for label in trained[0]["labels"])
    assert [pairs[1] for pairs in prompts_and_answers(dataset, fmt)] == ["4"]


def test_cased_text_column_trains_as_text(chat_tokenizer):
    dataset = load_records([{"Text": "Plain words to model."}])
    assert dataset.column_names == ["text"] and detect_format(dataset.column_names) == "text"
    assert len(tokenize_dataset(dataset, chat_tokenizer, fmt="text", max_length=64, train_on_prompt=False)) == 1


def test_cased_columns_without_loading():
    # detect_format and to_messages agree on their own, for a Dataset built by hand.
    assert detect_format(["Question", "Answer"]) == "prompt_completion"
    assert detect_format(["Prompt", "Completion"], "prompt_completion") == "prompt_completion"
    assert detect_format(["Instruction", "Output"], "alpaca") == "alpaca"
    assert to_messages({"Question": "q", "Answer": "a"}, "prompt_completion")[-1]["content"] == "a"


def test_an_ambiguous_case_is_left_alone():
    # `question` and `Question` both: which one is meant is not nbtune's guess to make.
    dataset = load_records([{"question": "q", "Question": "Q", "answer": "a"}])
    assert dataset.column_names == ["question", "Question", "answer"]
    assert to_messages(dataset[0], detect_format(dataset.column_names))[0]["content"] == "q"


@pytest.mark.parametrize(("columns", "hint"), [
    (["question", "anwser"], "`answer` for `anwser`"),
    (["promt", "completion"], "`prompt` for `promt`"),
    (["prompt", "complection"], "`completion` for `complection`"),
    (["instrucion", "output"], "`instruction` for `instrucion`"),
    (["mesages"], "`messages` for `mesages`"),
    (["Promt", "Completion"], "`prompt` for `Promt`"),
], ids=["anwser", "promt", "complection", "instrucion", "mesages", "cased-promt"])
def test_near_miss_columns_get_a_did_you_mean(columns, hint):
    with pytest.raises(DataError) as info:
        detect_format(columns)
    message = str(info.value)
    assert f"Did you mean {hint}?" in message and "\n" not in message
    for known in ("messages/conversations", "instruction+output", "prompt+completion", "prompt+response",
                  "question+answer", "text"):
        assert known in message


def test_far_columns_get_no_misleading_guess():
    with pytest.raises(DataError) as info:
        detect_format(["context", "label"])
    assert "Did you mean" not in str(info.value)


def test_a_declared_format_names_the_near_miss():
    with pytest.raises(DataError, match="Did you mean `instruction` for `instrucion`"):
        detect_format(["instrucion", "output"], "alpaca")


# ---------------------------------------------------------------- columns of mixed types


def _mixed_sources(tmp_path, rows):
    import pandas as pd

    path = tmp_path / "mixed.json"
    path.write_text(json.dumps({key: [row[key] for row in rows] for key in rows[0]}), encoding="utf-8")
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return {"dataframe": pd.DataFrame(rows), "list": rows, "json-columns": str(path), "jsonl": str(jsonl)}


@pytest.mark.parametrize("kind", ["dataframe", "list", "json-columns", "jsonl"])
def test_numbers_among_text_are_read_as_text(tmp_path, kind):
    rows = [{"question": "1+1", "answer": "2"}, {"question": "2+2", "answer": 4},
            {"question": "half of 3", "answer": 1.5}, {"question": "none", "answer": None}]
    dataset = load_records(_mixed_sources(tmp_path, rows)[kind])
    assert dataset["answer"] == ["2", "4", "1.5", None]  # missing stays missing, not 'None' or 'nan'
    assert to_messages(dataset[1], detect_format(dataset.column_names))[-1]["content"] == "4"


def test_a_dataframe_gap_in_a_mixed_column_stays_missing():
    import pandas as pd

    frame = pd.DataFrame({"prompt": ["a", "b", "c"], "completion": ["2", 4, float("nan")]})
    assert load_records(frame)["completion"] == ["2", "4", None]
    assert frame["completion"].tolist()[:2] == ["2", 4]  # the caller's DataFrame is left as it was


@pytest.mark.parametrize("kind", ["dataframe", "list", "json-columns", "jsonl"])
def test_a_column_mixing_lists_and_text_is_named(tmp_path, kind):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": ["d", "e"]}]
    with pytest.raises(DataError) as info:
        load_records(_mixed_sources(tmp_path, rows)[kind])
    message = str(info.value)
    assert "column `completion`" in message and "lists" in message and "row 1" in message
    assert info.value.field == "data" and "\n" not in message and "Arrow" not in message
