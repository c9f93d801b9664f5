"""Model resolution: local folders, nbtune's cache, aliases, and clear errors when nothing is reachable."""

from __future__ import annotations

import pytest

import nbtune
from nbtune.engine import models


def test_a_local_model_folder_is_used_as_is(tiny_model_dir):
    assert models.resolve_model(str(tiny_model_dir)) == tiny_model_dir


def test_a_folder_without_config_is_refused(tmp_path):
    with pytest.raises(nbtune.ModelError, match=r"no config\.json") as info:
        models.resolve_model(str(tmp_path))
    assert info.value.field == "model"


def test_a_missing_path_is_refused():
    with pytest.raises(nbtune.ModelError, match="not an existing folder"):
        models.resolve_model("./models/nothing-here")


def test_an_unreachable_hub_id_says_what_works_offline():
    with pytest.raises(nbtune.ModelError, match="works offline"):
        models.resolve_model("someone/no-such-model-xyz")


def test_the_cache_dir_follows_nbtune_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NBTUNE_CACHE", str(tmp_path / "cache"))
    assert models.cache_dir() == tmp_path / "cache"


def test_a_converted_model_in_the_cache_is_found_without_the_network(tmp_path, monkeypatch, tiny_model_dir):
    import shutil

    monkeypatch.setenv("NBTUNE_CACHE", str(tmp_path))
    cached = tmp_path / "models" / "HuggingFaceTB--SmolLM2-135M-Instruct"
    shutil.copytree(tiny_model_dir, cached)
    monkeypatch.setattr(models, "_from_hf_cache", lambda name: None)
    monkeypatch.setattr(models, "_from_gguf_wheel", lambda name: pytest.fail("must not fetch"))
    for name in ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2", "default"):
        assert models.resolve_model(name) == cached


def test_load_base_reads_a_local_folder(tiny_model_dir):
    base = models.load_base(str(tiny_model_dir))
    assert base.model.config.model_type == "llama"
    assert base.tokenizer.chat_template and base.quantization == "none"


def test_the_default_model_is_smollm2():
    assert nbtune.RunConfig().model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in models.GGUF_WHEELS


def test_a_model_folder_without_a_tokenizer_is_a_model_error(tmp_path, chat_tokenizer):
    from conftest import tiny_llama

    tiny_llama(chat_tokenizer).save_pretrained(tmp_path / "no-tokenizer")
    with pytest.raises(nbtune.ModelError, match="no usable tokenizer"):
        models.load_base(str(tmp_path / "no-tokenizer"))
