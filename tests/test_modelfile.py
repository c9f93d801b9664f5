"""The Ollama Modelfile written beside a GGUF export (its TEMPLATE translated from the chat template), and
which tokenizers GGUF export can describe to llama.cpp."""

from __future__ import annotations

import copy

import pytest

from nbtune.engine.export.modelfile import chat_pieces, modelfile, stop_words
from nbtune.errors import NbtuneError

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
          "{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}"
           "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")


def _with_template(tokenizer, template, **specials):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = template
    if specials:
        tokenizer.add_special_tokens(specials)
    return tokenizer


def test_chatml_becomes_an_ollama_template_with_its_stop_tokens(chat_tokenizer):
    pieces = chat_pieces(chat_tokenizer)
    assert pieces is not None
    assert (pieces.user_prefix, pieces.user_suffix) == ("<|im_start|>user\n", "<|im_end|>\n")
    assert pieces.generation_prompt == "<|im_start|>assistant\n" and pieces.no_system == ""
    text = modelfile("dates-q8_0.gguf", chat_tokenizer, None, 256)
    assert text.splitlines()[1] == "FROM ./dates-q8_0.gguf"
    assert ('TEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ else }}{{ end }}'
            '{{ range $i, $_ := .Messages }}') in text
    assert '{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n{{ if $last }}' in text
    assert 'PARAMETER stop "<|im_end|>"\nPARAMETER stop "<|im_start|>"' in text
    assert "PARAMETER temperature 0" in text and "PARAMETER num_ctx 256" in text
    assert "{{-" not in text  # no whitespace trimming: the literal newlines of the template must survive


def test_a_default_system_prompt_is_kept_for_conversations_without_one(chat_tokenizer):
    template = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are Dates.<|im_end|>\\n' }}"
                "{% endif %}" + chat_tokenizer.chat_template)
    pieces = chat_pieces(_with_template(chat_tokenizer, template))
    assert pieces.no_system == "<|im_start|>system\nYou are Dates.<|im_end|>\n"
    assert pieces.render(None, [("user", "hi")]).startswith("<|im_start|>system\nYou are Dates.")


def test_llama3s_template_translates_with_bos_and_eot(chat_tokenizer):
    tokenizer = _with_template(chat_tokenizer, LLAMA3, bos_token="<|begin_of_text|>",
                               additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    pieces = chat_pieces(tokenizer)
    assert pieces is not None
    assert pieces.system_prefix == "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    assert pieces.no_system == "<|begin_of_text|>"
    assert pieces.assistant_suffix == "<|eot_id|>"
    assert "<|eot_id|>" in stop_words(tokenizer, pieces)
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                    {"role": "user", "content": "Again"}]
    assert pieces.render(None, [(m["role"], m["content"]) for m in conversation]) == \
        tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)


def test_a_template_that_folds_the_system_prompt_gets_no_template_line(chat_tokenizer):
    tokenizer = _with_template(chat_tokenizer, MISTRAL, bos_token="<s>")
    assert chat_pieces(tokenizer) is None
    text = modelfile("m.gguf", tokenizer, None, 32768)
    assert "TEMPLATE" not in text.replace("# No TEMPLATE", "") and "Ollama reads the one in the GGUF file" in text
    assert "PARAMETER num_ctx 8192" in text


def test_no_chat_template_means_no_template_line(plain_tokenizer):
    assert chat_pieces(plain_tokenizer) is None
    assert 'PARAMETER stop "<|endoftext|>"' in modelfile("m.gguf", plain_tokenizer, None, 512)


def test_sampling_settings_come_from_the_generation_config(chat_tokenizer):
    from transformers import GenerationConfig

    text = modelfile("m.gguf", chat_tokenizer, GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9), 512)
    assert "PARAMETER temperature 0.7" in text and "PARAMETER top_p 0.9" in text


# ---------------------------------------------------------------- tokenizers llama.cpp can read back
def _with_pre_tokenizer(tokenizer, pre):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.backend_tokenizer.pre_tokenizer = pre
    return tokenizer


def test_pre_tokenizers_get_llama_cpps_names(chat_tokenizer):
    from tokenizers import Regex, pre_tokenizers
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    from nbtune.engine.export.gguf_vocab import pre_tokenizer_name

    assert pre_tokenizer_name(chat_tokenizer) == "gpt-2"
    digits = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                      pre_tokenizers.ByteLevel(add_prefix_space=False)])
    assert pre_tokenizer_name(_with_pre_tokenizer(chat_tokenizer, digits)) == "smollm"
    for regex, name in ((GGUF_PRE_TOKENIZER_SPLITS["llama3"], "llama-bpe"),
                        (GGUF_PRE_TOKENIZER_SPLITS["qwen2"], "qwen2")):
        split = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        assert pre_tokenizer_name(_with_pre_tokenizer(chat_tokenizer, split)) == name
    odd = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex("[a-z]+"), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert pre_tokenizer_name(_with_pre_tokenizer(chat_tokenizer, odd)) is None


def test_a_sentencepiece_style_tokenizer_is_refused_by_name(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from nbtune.engine.export.gguf_vocab import gguf_vocab

    vocab = {"<unk>": 0, "▁a": 1, "a": 2, "▁": 3}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "a")], unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(NbtuneError, match=r"sentencepiece-style .* supported: byte-level BPE"):
        gguf_vocab(tokenizer, 4, tmp_path)


def test_a_bos_the_tokenizer_adds_itself_is_not_written_twice(chat_tokenizer):
    from tokenizers import processors

    tokenizer = _with_template(chat_tokenizer, LLAMA3, bos_token="<|begin_of_text|>",
                               additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    written = modelfile("m.gguf", tokenizer, None, 64)
    assert 'TEMPLATE """{{ if .System }}<|begin_of_text|><|start_header_id|>' in written
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    assert tokenizer("hi")["input_ids"][0] == bos  # llama.cpp adds it too (add_bos_token in the file)
    text = modelfile("m.gguf", tokenizer, None, 64)
    assert 'TEMPLATE """{{ if .System }}<|start_header_id|>system' in text and "<|begin_of_text|>" not in text


def test_stop_words_are_written_as_ollama_reads_them(chat_tokenizer):
    from nbtune.engine.export.modelfile import _quoted

    assert _quoted("<|im_end|>") == '"<|im_end|>"'
    assert _quoted('say "x"') == '"""say "x""""'  # Ollama unescapes nothing: no backslashes
    assert _quoted("a\\b") == '"a\\b"'


def test_added_tokens_get_llama_cpps_token_types(chat_tokenizer, tmp_path):
    import gguf

    from nbtune.engine.export.gguf_vocab import gguf_vocab

    tokenizer = copy.deepcopy(chat_tokenizer)
    tokenizer.add_tokens(["<|fim_prefix|>", "<think>"])  # neither marked special
    vocab = gguf_vocab(tokenizer, len(tokenizer) + 3, tmp_path)
    kind = dict(zip(vocab.tokens, vocab.token_types, strict=True))
    assert kind["<|fim_prefix|>"] == gguf.TokenType.CONTROL  # looks special: llama.cpp's converter says so too
    assert kind["<think>"] == gguf.TokenType.USER_DEFINED
    assert kind["<|im_end|>"] == gguf.TokenType.CONTROL
    assert vocab.tokens[-1] == f"[PAD{len(tokenizer) + 2}]" and vocab.token_types[-1] == gguf.TokenType.UNUSED
    with pytest.raises(NbtuneError, match=r"token ids up to .* embedding has 10 rows"):
        gguf_vocab(tokenizer, 10, tmp_path)


def test_gpt2s_split_is_named_smollm_when_digits_never_merge_and_spaces_are_kept(chat_tokenizer):
    from nbtune.engine.export.gguf_vocab import pre_tokenizer_name

    assert pre_tokenizer_name(chat_tokenizer) == "gpt-2"  # its vocabulary has tokens like '17': digits merge
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab={"a": 0, "1": 1, "9": 2, "Ġ": 3, "Ġa": 4}, merges=[("Ġ", "a")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    no_digits = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False)
    assert pre_tokenizer_name(no_digits) == "smollm"
    no_digits.clean_up_tokenization_spaces = True
    assert pre_tokenizer_name(no_digits) == "gpt-2"
    prefixed = _with_pre_tokenizer(chat_tokenizer, pre_tokenizers.ByteLevel(add_prefix_space=True))
    assert pre_tokenizer_name(prefixed) is None  # llama.cpp never adds a leading space to byte-level text
