"""Model resolution: local folders, nbtune's cache, aliases, and clear errors when nothing is reachable."""

from __future__ import annotations

import pytest

import nbtune
from nbtune.engine.bases import loading as models


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


def test_a_cached_fp32_model_is_loaded_in_bf16_from_a_bf16_copy_made_once(tmp_path, monkeypatch, tiny_model_dir):
    import shutil

    import torch

    monkeypatch.setenv("NBTUNE_CACHE", str(tmp_path))
    cached = tmp_path / "models" / "HuggingFaceTB--SmolLM2-135M-Instruct"
    shutil.copytree(tiny_model_dir, cached)
    assert models._stored_dtype(cached) == "F32"
    monkeypatch.setattr(models, "_from_hf_cache", lambda name: None)
    reference = models.load_base("default", dtype="float32").model.state_dict()

    base = models.load_base("default", dtype="bfloat16")
    copy = tmp_path / "models" / "HuggingFaceTB--SmolLM2-135M-Instruct@bfloat16"
    assert models._stored_dtype(copy) == "BF16" and models._stored_dtype(cached) == "F32"
    assert base.model.dtype == torch.bfloat16 and base.model.name_or_path == str(cached)
    for key, value in base.model.state_dict().items():  # the same rounding as casting the fp32 weights
        assert torch.equal(value, reference[key].to(torch.bfloat16)), key
    written = (copy / "model.safetensors").stat().st_mtime_ns
    models.load_base("default", dtype="bfloat16")
    assert (copy / "model.safetensors").stat().st_mtime_ns == written  # made once


def test_a_users_own_fp32_folder_is_read_as_it_is(tmp_path, tiny_model_dir):
    import torch

    base = models.load_base(str(tiny_model_dir), dtype="bfloat16")
    assert base.model.dtype == torch.bfloat16
    assert [p.name for p in tiny_model_dir.parent.iterdir() if "@" in p.name] == []
