"""Writing a merged transformers model as one GGUF file (llama.cpp, Ollama, LM Studio) with the `gguf`
package's writer, its architecture names and its tensor-name tables.

Which models: `ARCHITECTURES` (transformers `model_type` -> llama.cpp architecture). The metadata keys are
those the default model's own GGUF file carries for its architecture (general.*, <arch>.* hyperparameters,
tokenizer.ggml.*, tokenizer.chat_template). Quantisations: `QUANTS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbtune.errors import NbtuneError


@dataclass(frozen=True)
class Architecture:
    """How one transformers architecture is written."""

    gguf_name: str  # llama.cpp's architecture (gguf.MODEL_ARCH_NAMES value)
    rotate_qk: bool  # llama.cpp's llama graph expects q/k rows in its rope order (see `_llama_rope_order`)


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", rotate_qk=True),  # Llama 1-3, SmolLM/SmolLM2
    "mistral": Architecture("llama", rotate_qk=True),  # llama.cpp reads Mistral as llama
    "qwen2": Architecture("qwen2", rotate_qk=False),
}

# quant -> (file type recorded in general.file_type, bytes per weight of a 2-D tensor)
QUANTS: dict[str, tuple[str, float]] = {"f16": ("MOSTLY_F16", 2.0), "bf16": ("MOSTLY_BF16", 2.0),
                                        "q8_0": ("MOSTLY_Q8_0", 34 / 32)}


def check_architecture(config: Any) -> Architecture:
    """The model's architecture as GGUF writes it; any other, or settings the file cannot carry, refused
    by name."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise NbtuneError(
            f"GGUF export does not support the {model_type!r} architecture; supported: "
            f"{', '.join(sorted(ARCHITECTURES))} (Llama, SmolLM, Mistral, Qwen2). Export safetensors instead: "
            "run.export(path).", field="model")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise NbtuneError(
            f"the model uses {rope.get('rope_type', rope.get('type'))!r} rope scaling, which nbtune's GGUF export "
            "cannot write and check yet (only unscaled rope); export safetensors instead: run.export(path).",
            field="model")
    for flag in ("attention_bias", "mlp_bias"):
        if model_type in ("llama", "mistral") and getattr(config, flag, False):
            raise NbtuneError(f"the model has `{flag}: true`, which a GGUF file read back as this architecture "
                              "loses; export safetensors instead: run.export(path).", field="model")
    return ARCHITECTURES[model_type]


def check_quant(quant: str) -> str:
    if quant not in QUANTS:
        import difflib

        close = difflib.get_close_matches(str(quant).lower(), QUANTS, n=1)
        hint = f"Did you mean `{close[0]}`? " if close else ""
        raise NbtuneError(f"unknown GGUF quantisation {quant!r}. {hint}Choose one of: {', '.join(QUANTS)}.",
                          field="quant")
    return quant


def file_bytes(model: Any, quant: str) -> int:
    """About how large the GGUF file of `model` at `quant` is (weights only; the tokenizer comes on top)."""
    per_weight = QUANTS[quant][1]
    total = 0
    for _name, tensor in _written_tensors(model):
        total += int(tensor.numel() * (4 if tensor.dim() <= 1 else per_weight))
    return total


def write_gguf(path: Path, model: Any, vocab: Any, quant: str, *, name: str, base_name: str | None) -> None:
    """Write `model` (a plain transformers model, adapter merged) and its tokenizer to `path`."""
    import gguf

    from nbtune.engine.export.gguf_vocab import add_vocab

    config = model.config
    arch = check_architecture(config)
    writer = gguf.GGUFWriter(str(path), arch.gguf_name)
    try:
        _add_general(writer, quant, name, base_name)
        _add_hyperparameters(writer, config, embedding_rows(model))
        add_vocab(writer, vocab)
        names = gguf.get_tensor_name_map(_model_arch(arch.gguf_name), config.num_hidden_layers)
        for hf_name, tensor in _written_tensors(model):
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise NbtuneError(f"GGUF has no name for the model's tensor {hf_name!r}; this model cannot be "
                                  "exported as GGUF.", field="model")
            data = tensor.detach().to("cpu").float().numpy()
            if arch.rotate_qk and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads
                data = _llama_rope_order(data, heads)
            _add_tensor(writer, gguf_name, data, quant)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def embedding_rows(model: Any) -> int:
    """Rows of the input embedding: the vocabulary size llama.cpp checks the token list against (it may
    differ from config.vocab_size after a resize)."""
    return int(model.get_input_embeddings().weight.shape[0])


def _written_tensors(model: Any) -> list[tuple[str, Any]]:
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    out = []
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue  # recomputed by the reader / the reader uses the embedding as the output layer
        out.append((hf_name, tensor))
    return out


def _add_general(writer: Any, quant: str, name: str, base_name: str | None) -> None:
    import gguf

    writer.add_type("model")
    # Never the bare run name: transformers' reader takes a llama file named exactly "mistral" for its own
    # mistral type and then cannot map its tensors.
    writer.add_name(f"{name} (fine-tune of {base_name})" if base_name else f"{name} (nbtune fine-tune)")
    writer.add_finetune(name)
    if base_name:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, base_name)
    writer.add_file_type(getattr(gguf.LlamaFileType, QUANTS[quant][0]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_hyperparameters(writer: Any, config: Any, vocab_size: int) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _rope_theta(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return rope.get("rope_theta") or getattr(config, "rope_theta", 10000.0)


def _add_tensor(writer: Any, name: str, data: Any, quant: str) -> None:
    import gguf
    import numpy as np

    if data.ndim <= 1:  # norms and biases stay fp32, as llama.cpp writes them
        writer.add_tensor(name, data.astype(np.float32))
        return
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    if quant == "f16" or (quant == "q8_0" and data.shape[-1] % block):
        writer.add_tensor(name, data.astype(np.float16))  # a row q8_0 blocks cannot tile: f16, as llama.cpp
        return
    qtype = gguf.GGMLQuantizationType.BF16 if quant == "bf16" else gguf.GGMLQuantizationType.Q8_0
    writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def _llama_rope_order(weights: Any, heads: int) -> Any:
    """q/k projection rows in the order llama.cpp's rope expects: transformers' Llama rotates the two halves
    of each head (rotate_half), llama.cpp's llama graph rotates adjacent pairs, so each head's rows are
    interleaved. Hand-written: the `gguf` package has no such helper (llama.cpp does it in its conversion
    script); transformers' GGUF reader undoes exactly this (`LlamaTensorProcessor`)."""
    rows = weights.shape[0]
    return (weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _model_arch(gguf_name: str) -> Any:
    import gguf

    return next(arch for arch, arch_name in gguf.MODEL_ARCH_NAMES.items() if arch_name == gguf_name)
