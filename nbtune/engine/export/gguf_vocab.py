"""A transformers tokenizer as GGUF metadata: the vocabulary with llama.cpp's token types, the name of the
pre-tokenizer llama.cpp should split text with, and (through the `gguf` package's `SpecialVocab`) the merges,
special token ids, BOS/EOS flags and the chat template.

The token list and the pre-tokenizer name are hand-written here: `gguf.vocab.BpeVocab` marks every token of
the main vocabulary NORMAL (SmolLM2's `<|im_start|>` is in it and must be CONTROL, or a reader cuts it into
pieces), and llama.cpp names pre-tokenizers only inside its conversion script, not in the `gguf` package.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbtune.errors import NbtuneError

# llama.cpp's names for the ways byte-level BPE vocabularies split text before merging, keyed by what a
# tokenizer.json says. Splits given by a regex are matched against transformers' own table of the same
# names (transformers.integrations.gguf), so a file nbtune writes reads back with the split it was made with.
_GPT2_NAME = "gpt-2"
_DIGITS_THEN_GPT2 = "smollm"  # SmolLM's tokenizer.json: single digits, then GPT-2's byte-level split
_PREFERRED_NAMES = ("llama-bpe", "qwen2", "tekken", "gpt-4o", "qwen35")

SUPPORTED_TOKENIZERS = ("byte-level BPE (GPT-2, SmolLM, Llama 3, Qwen2, Mistral Nemo)",)


@dataclass(frozen=True)
class GgufVocab:
    """What the writer adds for the tokenizer."""

    tokens: list[str]
    token_types: list[int]
    pre: str
    folder: Path  # the tokenizer saved, for gguf.vocab.SpecialVocab


def tokenizer_kind(tokenizer: Any) -> str | None:
    """`"gpt2"` for a byte-level BPE tokenizer llama.cpp reads as such, else None."""
    spec = _tokenizer_json(tokenizer)
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if model.get("type") == "BPE" and not model.get("byte_fallback") and _has_type(decoder, "ByteLevel"):
        return "gpt2"
    return None


def pre_tokenizer_name(tokenizer: Any) -> str | None:
    """llama.cpp's name (`tokenizer.ggml.pre`) for how this byte-level tokenizer splits text, or None."""
    pre = _tokenizer_json(tokenizer).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if steps[-1].get("add_prefix_space"):  # llama.cpp's byte-level splits never add a leading space
        return None
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return _gpt2_split_name(tokenizer)
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return _DIGITS_THEN_GPT2
    if (kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True)
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")):
        return _regex_name((steps[0].get("pattern") or {}).get("Regex"))
    return None


def _gpt2_split_name(tokenizer: Any) -> str:
    """GPT-2's split, which llama.cpp names "gpt-2" and decodes with its spaces before punctuation cleaned up.
    A vocabulary without one token of two digits splits into the same tokens under SmolLM's digit-by-digit
    rule, whose llama.cpp name ("smollm") leaves spaces alone: that one, when the tokenizer does not clean up
    spaces either (nbtune's default model: its GGUF file says "smollm", transformers' reader drops the digit
    step)."""
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return _GPT2_NAME
    digits = re.compile(r"\d\d")
    return _GPT2_NAME if any(digits.search(token) for token in tokenizer.get_vocab()) else _DIGITS_THEN_GPT2


def _regex_name(regex: str | None) -> str | None:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    names = [name for name, split in GGUF_PRE_TOKENIZER_SPLITS.items() if split == regex]
    preferred = [name for name in _PREFERRED_NAMES if name in names]
    return (preferred or names or [None])[0]


def check_tokenizer(tokenizer: Any) -> str:
    """The pre-tokenizer's llama.cpp name; a tokenizer llama.cpp could not read back as it is refused by name."""
    kind, pre = tokenizer_kind(tokenizer), pre_tokenizer_name(tokenizer)
    if kind is None or pre is None:
        what = "a sentencepiece-style or other non-byte-level" if kind is None else "a byte-level"
        raise NbtuneError(
            f"the model's tokenizer is {what} tokenizer whose text splitting GGUF export does not know "
            f"({_describe(tokenizer)}); supported: {', '.join(SUPPORTED_TOKENIZERS)}. Export the merged model "
            "as safetensors instead: run.export(path) (llama.cpp's convert_hf_to_gguf.py reads that).",
            field="tokenizer")
    return pre


def gguf_vocab(tokenizer: Any, n_vocab: int, folder: Path) -> GgufVocab:
    """The tokenizer's vocabulary padded to the model's `n_vocab` rows, with token types; its files saved in
    `folder`. Refuses (by name) a tokenizer llama.cpp could not read back as it is."""
    import gguf

    pre = check_tokenizer(tokenizer)
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(by_id) >= n_vocab:
        raise NbtuneError(f"the tokenizer has token ids up to {max(by_id)} but the model's embedding has {n_vocab} "
                          "rows; resize the embedding (model.resize_token_embeddings) before exporting.",
                          field="tokenizer")
    # As llama.cpp's converter: an added token is CONTROL when marked special or when it looks like one
    # (`<|...|>`; Qwen2's <|fim_prefix|> is not marked special), else USER_DEFINED.
    special = {index for index, added in tokenizer.added_tokens_decoder.items()
               if added.special or _looks_special(added.content)}
    added = set(tokenizer.added_tokens_decoder)
    tokens, types = [], []
    for index in range(n_vocab):
        token = by_id.get(index)
        if token is None:  # rows the embedding has past the vocabulary: llama.cpp's padding names
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if index in special
                         else gguf.TokenType.USER_DEFINED if index in added else gguf.TokenType.NORMAL)
    tokenizer.save_pretrained(str(folder))
    return GgufVocab(tokens=tokens, token_types=[int(t) for t in types], pre=pre, folder=folder)


_BAR = "\uff5c"  # the full-width vertical bar around the names of DeepSeek's special tokens


def _looks_special(text: str) -> bool:
    return any(text.startswith(f"<{bar}") and text.endswith(f"{bar}>") for bar in ("|", _BAR))


def add_vocab(writer: Any, vocab: GgufVocab) -> None:
    """Write the tokenizer's keys into a `gguf.GGUFWriter`."""
    import gguf

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    special = gguf.SpecialVocab(vocab.folder, load_merges=True, n_vocab=len(vocab.tokens))
    special.add_to_gguf(writer, quiet=True)


def vocab_bytes(tokenizer: Any) -> int:
    """About how many bytes the tokenizer takes in a GGUF file (tokens, types, merges), for the disk check."""
    spec = _tokenizer_json(tokenizer)
    merges = (spec.get("model") or {}).get("merges") or []
    tokens = sum(len(t.encode("utf-8")) + 12 for t in tokenizer.get_vocab())
    return tokens + sum(len(str(m)) + 8 for m in merges) + len(tokenizer.chat_template or "")


def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise NbtuneError("GGUF export needs a fast (tokenizers) tokenizer; load it with use_fast=True.",
                          field="tokenizer")
    return json.loads(backend.to_str())


def _has_type(component: dict[str, Any], kind: str) -> bool:
    parts = component.get("decoders") or component.get("pretokenizers") or [component]
    return any(part.get("type") == kind for part in parts)


def _describe(tokenizer: Any) -> str:
    spec = _tokenizer_json(tokenizer)
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return f"model {(spec.get('model') or {}).get('type')}, pre-tokenizer {'+'.join(str(s.get('type')) for s in steps)}"
