"""What the model sees (`nbtune.preview`, `%%finetune NAME --preview`, `nbtune preview`): the first training
batch's tokens, loss flags, padding and truncation, exactly as the Trainer gets them, without any weights."""

from __future__ import annotations

import json

import pytest
from conftest import nbtune_shell

import nbtune
from nbtune.cli import main
from nbtune.config import RunConfig
from nbtune.data.preview import BatchPreview, preview_batch, rendered_text
from nbtune.data.splits import read_data
from nbtune.data.tokenize import IGNORE_INDEX, encode
from nbtune.errors import ConfigError, NbtuneWarning
from nbtune.widgets.formatters import html_of


def config(rows, **keys):
    return RunConfig.parse({"data": rows, "batch_size": 4, "metric": "none", "save": False, **keys})


def encoded(cfg, record, tokenizer, fmt="prompt_completion"):
    return encode(record, tokenizer=tokenizer, fmt=fmt, max_length=cfg.max_length,
                  train_on_prompt=cfg.train_on_prompt)


def unpadded(ex, values):
    return [v for v, pad in zip(values, ex.padding, strict=True) if not pad]


def test_loss_flags_are_the_labels_training_uses_and_padding_fills_the_batch(chat_tokenizer, demo_rows):
    cfg = config(demo_rows)
    batch = preview_batch(cfg, chat_tokenizer, n=4)
    train = read_data(cfg)[0]
    assert len(batch.examples) == 4 and len({ex.row for ex in batch.examples}) == 4
    width = len(batch.examples[0].token_ids)
    for ex in batch.examples:
        enc = encoded(cfg, train[ex.row], chat_tokenizer)
        assert unpadded(ex, ex.token_ids) == enc["input_ids"]
        assert unpadded(ex, ex.loss) == [label != IGNORE_INDEX for label in enc["labels"]]
        assert len(ex.token_ids) == width and ex.padded == width - ex.length == sum(ex.padding)
        assert not any(loss and pad for loss, pad in zip(ex.loss, ex.padding, strict=True))
        assert ex.padding[ex.length:] == [True] * ex.padded  # right padding, as the collator pads
        assert 0 < ex.loss_tokens < ex.length and not ex.truncated and ex.full_length == ex.length
        assert ex.text == rendered_text(train[ex.row], chat_tokenizer, "prompt_completion")
        assert ex.special[0] and ex.tokens[0] == "<|im_start|>"
    multiple = batch.pad_to_multiple_of or 1  # 8 on a GPU, as the training collator rounds up there
    assert width == -(-max(ex.length for ex in batch.examples) // multiple) * multiple  # the longest sets it
    assert any(ex.padded for ex in batch.examples)
    first = batch.examples[0]
    assert "Ġ" in "".join(first.tokens) and "Ġ" not in "".join(first.pieces)  # byte-level shown as text
    assert "".join(unpadded(first, first.pieces)) == first.text


def test_text_shows_the_loss_tokens_marked_with_lengths(chat_tokenizer, demo_rows):
    batch = preview_batch(config(demo_rows), chat_tokenizer, n=2)
    text = str(batch)
    assert repr(batch) == text
    assert "first training batch: 2 of its 4 examples" in text and "reproduced exactly" in text
    ex = batch.examples[0]
    answer = demo_rows[ex.row]["completion"]
    assert f"[[{answer}<|im_end|>\n]]" in text  # the answer and its end marker carry loss, the prompt not
    assert f"{ex.length} tokens, {ex.loss_tokens} carry loss, {ex.padded} padding" in text
    df = batch.df
    assert len(df) == sum(len(e.token_ids) for e in batch.examples)
    assert list(df.columns[:3]) == ["example", "row", "pos"]
    assert df.loss.sum() == sum(e.loss_tokens for e in batch.examples)


def test_a_small_max_length_is_flagged_as_truncation(chat_tokenizer, demo_rows):
    cfg = config(demo_rows, max_length=40)
    batch = preview_batch(cfg, chat_tokenizer, n=4)
    assert all(ex.truncated and ex.length == 40 < ex.full_length for ex in batch.examples)
    train = read_data(cfg)[0]
    for ex in batch.examples:
        untruncated = encode(train[ex.row], tokenizer=chat_tokenizer, fmt="prompt_completion", max_length=10_000,
                             train_on_prompt=False)
        assert ex.full_length == untruncated["length"]
    assert "TRUNCATED: max_length 40 keeps 40 of its" in str(batch)
    assert "TRUNCATED 40/" in html_of(batch)


def test_rows_without_an_answer_left_are_skipped_as_training_skips_them(chat_tokenizer, demo_rows):
    rows = [{"prompt": "word " * 80, "completion": "gone"}, *demo_rows[:7]]
    cfg = config(rows, max_length=48)
    with pytest.warns(NbtuneWarning, match="1 of 8 examples"):
        batch = preview_batch(cfg, chat_tokenizer, n=7)
    assert batch.dropped == 1 and batch.total == 7 and "not trained on" in str(batch)
    assert 0 not in {ex.row for ex in batch.examples} and len(batch.examples) == 7
    for ex in batch.examples:  # each example is matched with its own row
        assert unpadded(ex, ex.token_ids) == encoded(cfg, rows[ex.row], chat_tokenizer)["input_ids"]


def test_plain_text_rows_carry_loss_on_every_token(plain_tokenizer):
    rows = [{"text": "Hello world."}, {"text": "What is the answer? Hello world. Hello."}, {"text": "Hello"}]
    batch = preview_batch(config(rows, batch_size=3), plain_tokenizer, n=3)
    assert batch.fmt == "text" and "every token (plain text rows)" in batch.header()
    for ex in batch.examples:
        assert unpadded(ex, ex.loss) == [True] * ex.length
        assert ex.tokens[ex.length - 1] == "<|endoftext|>"  # EOS, trained on too
    assert sum(ex.padded for ex in batch.examples) > 0  # the pad token prepare_tokenizer gave it


def test_html_highlights_loss_and_escapes_the_data(plain_tokenizer, chat_tokenizer, demo_rows):
    batch = preview_batch(config([{"text": "a <b>bold</b> & <script>x</script>"}] * 2), plain_tokenizer, n=1)
    page = html_of(batch)
    assert "nbt-loss" in page and "background:#b7e4b0" in page
    assert "<b>" not in page.replace("<b>1/1</b>", "") and "<script>" not in page
    assert "&lt;" in page and "&amp;" in page
    page = html_of(preview_batch(config(demo_rows), chat_tokenizer, n=4))
    assert "nbt-pad" in page and "nbt-special" in page and "↵" in page and "carries loss" in page


@pytest.mark.parametrize("bad", [0, -1, 1.5, "4", True, None])
def test_a_bad_n_is_refused_before_anything_is_read(bad, chat_tokenizer):
    cfg = config("no/such/file.jsonl")
    with pytest.raises(ConfigError, match="`n`") as info:
        preview_batch(cfg, chat_tokenizer, n=bad)
    assert info.value.field == "n" and len(str(info.value).splitlines()) == 1
    with pytest.raises(ConfigError, match="`n`"):
        nbtune.preview({"data": "no/such/file.jsonl"}, n=bad)


def test_data_problems_are_the_usual_data_error(tiny_model_dir):
    with pytest.raises(nbtune.DataError):
        nbtune.preview({"data": "no/such/file.jsonl", "model": str(tiny_model_dir)})


def test_the_preview_is_the_trainers_first_batch(llama_base, demo_rows, monkeypatch):
    """The order, the encoding and the padding are training's own: a real run's first batch, recorded."""
    from nbtune.engine.training import trainer

    keys = dict(method="lora", data=demo_rows, steps=1, batch_size=4, grad_accum=2, seed=7, metric="none",
                save=False)
    batch = preview_batch(RunConfig.parse(keys), llama_base[1], n=6)  # one batch and a half
    seen = []
    make = trainer.make_collator

    def recording(tokenizer, policy):
        collate = make(tokenizer, policy)

        def call(features):
            out = collate(features)
            seen.append(out)
            return out

        return call

    monkeypatch.setattr(trainer, "make_collator", recording)
    nbtune.finetune(base=llama_base, **keys)
    for ex in batch.examples:
        got = seen[ex.position // 4]
        j = ex.position % 4
        assert ex.token_ids == got["input_ids"][j].tolist()
        assert ex.loss == [label != IGNORE_INDEX for label in got["labels"][j].tolist()]
        assert ex.padding == [mask == 0 for mask in got["attention_mask"][j].tolist()]
    assert "first 2 training batches: 6 examples, 4 per batch" in str(batch)


def test_nbtune_preview_loads_the_tokenizer_only(tiny_model_dir, demo_rows):
    from nbtune.engine import workbench

    batch = nbtune.preview({"data": demo_rows, "model": str(tiny_model_dir)}, n=3, batch_size=2)
    assert isinstance(batch, BatchPreview) and len(batch.examples) == 3 and batch.batch_size == 2
    assert "first 2 training batches" in str(batch)
    assert workbench.WORKBENCH.bases == {} and not workbench.WORKBENCH.runs


def test_a_cached_base_lends_its_tokenizer_without_being_changed(plain_tokenizer, demo_rows):
    from nbtune.engine import workbench
    from nbtune.engine.bases.loading import Base

    workbench.WORKBENCH.bases[("my-model", "none", "float32", False)] = Base(model=None, tokenizer=plain_tokenizer,
                                                                            name="my-model")
    batch = nbtune.preview({"data": demo_rows, "model": "my-model"}, n=1)  # no such model to load: the cached one
    assert batch.pad_token == "<|endoftext|>" and plain_tokenizer.pad_token is None
    assert plain_tokenizer.chat_template is None


def test_the_magic_previews_without_loading_weights(tiny_model_dir, demo_rows):
    from nbtune.engine import workbench

    with nbtune_shell(tiny_model_dir, rows=demo_rows) as ip:
        batch = ip.run_cell_magic("finetune", "peek --preview", "data: {{ rows }}\nbatch_size: 4\nmax_length: 40\n")
        assert isinstance(batch, BatchPreview) and len(batch.examples) == 4
        assert all(ex.truncated for ex in batch.examples) and batch.model == str(tiny_model_dir)
        assert workbench.WORKBENCH.bases == {} and "peek" not in workbench.WORKBENCH.runs
        result = ip.run_cell("%%finetune peek --preview\nmethod: lroa\n")
        assert not result.success and "lora" in str(result.error_in_exec)  # the config is checked first


def test_the_magic_help_names_the_flag():
    from nbtune.magics.finetune import Finetune

    assert "--preview" in Finetune.finetune.__doc__


def test_the_cli_prints_the_preview(tiny_model_dir, demo_rows, tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in demo_rows), encoding="utf-8")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ndata: {data}\nbatch_size: 4\n", encoding="utf-8")
    assert main(["preview", str(cfg), "-n", "2", "--set", "max_length=40"]) == 0
    out = capsys.readouterr().out
    assert "first training batch: 2 of its 4 examples" in out and "[[" in out and "TRUNCATED" in out
    assert out.count("\n[1/2] row ") == 1 and "\n[2/2] row " in out
    assert main(["preview", str(cfg), "-n", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nbtune: error: `n`")


def test_gpu_padding_rounds_the_batch_up_as_training_does(chat_tokenizer, demo_rows, monkeypatch):
    from nbtune.engine.compute import device

    on_gpu = device.with_changes(device.current(), pad_to_multiple_of=8)  # what the CUDA policy sets
    monkeypatch.setattr(device, "current", lambda: on_gpu)
    batch = preview_batch(config(demo_rows), chat_tokenizer, n=4)
    widths = {len(ex.token_ids) for ex in batch.examples}
    assert len(widths) == 1 and widths.pop() % 8 == 0 and "a multiple of 8" in batch.header()
    assert all(ex.padded == len(ex.token_ids) - ex.length for ex in batch.examples)
