"""Estimates for a config without loading any weights: the model is built on PyTorch's meta device.

What they are: trainable parameters (exact, from the method applied to the meta model), adapter size
(trainable x 4 bytes), memory split into weights / trainable + grads / optimizer / activations, and a
step cost relative to LoRA from FLOPs per token: 4N for the frozen forward and backward through the
activations, plus 2T for the trainable weights' gradients (6N for full fine-tuning, which matches the
1.5x measured in bench/methods.py).
"""

from __future__ import annotations

from typing import Any

from nbtune.config import RunConfig

_BYTES = {"none": None, "4bit": 0.5625, "8bit": 1.0625}  # incl. the quantisation scales
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def estimate(config: RunConfig) -> dict[str, Any]:
    """Parameter counts, sizes and memory for `config`, computed on a weightless (meta) model."""
    import tempfile
    from pathlib import Path

    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from nbtune.engine.bases.loading import resolve_model
    from nbtune.engine.compute.memory import count_parameters
    from nbtune.engine.compute.preflight import training_memory_mb
    from nbtune.methods import MethodContext, get_method

    model_config = AutoConfig.from_pretrained(resolve_model(config.model))
    method = get_method(config.method)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(model_config)
    model.tie_weights()  # tied embeddings are one tensor, as in the loaded model
    options = dict(config.options)
    if method.weightless_options is not None:  # e.g. PiSSA's SVD cannot run on meta tensors; the counts agree
        options = method.weightless_options(options)
    with tempfile.TemporaryDirectory() as folder:
        ctx = MethodContext(options=options, config=config, workdir=Path(folder),
                            total_steps=max(config.steps or 100, 2))
        prepared = method.prepare(model, ctx)
        counts = count_parameters(prepared)
    total, trainable = counts["total_params"], counts["trainable_params"]
    hidden = getattr(model_config, "hidden_size", 0) or getattr(model_config, "n_embd", 0)
    layers = getattr(model_config, "num_hidden_layers", 0) or getattr(model_config, "n_layer", 0)
    per_weight = _BYTES[str(config.quantization)] or _DTYPE_BYTES[config.dtype]
    embedding = model.get_input_embeddings().weight.numel()  # never quantized by bitsandbytes
    activation_bytes = 2 if config.precision == "bf16" else _DTYPE_BYTES[config.dtype]  # autocast keeps bf16 ones
    # an upper bound: every sequence at max_length
    training = training_memory_mb(trainable, hidden, layers, config.batch_size * config.max_length, activation_bytes,
                                  checkpointing=config.gradient_checkpointing and method.gradient_checkpointing)
    mb = 2**20
    flops = 6 * total if trainable == total else 4 * total + 2 * trainable
    return {
        **counts,
        "adapter_mb": round(trainable * 4 / mb, 2),
        "weights_mb": round((max(total - trainable - embedding, 0) * per_weight
                             + min(embedding, total - trainable) * _DTYPE_BYTES[config.dtype]) / mb),
        **{key: round(value) for key, value in training.items()},
        "step_cost": round(flops / (4 * total), 2),
        "layers": layers,
    }


STRATEGIES = ("ddp", "zero2", "fsdp")


def per_process_mb(estimated: dict[str, Any], processes: int, strategy: str = "ddp") -> dict[str, float]:
    """Memory of each of `processes` processes (one per GPU) training as `estimated` says, in MB.

    `activations_mb` is per process already (it follows `batch_size`, which is per process). DDP keeps a
    full copy of everything in each process; DeepSpeed ZeRO-2 shards gradients and optimizer state; FSDP
    (full shard) shards weights too, and gathers one layer's weights at a time to compute with it.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
    weights, trainable_grads = estimated["weights_mb"], estimated["trainable_and_grads_mb"]
    optimizer, activations = estimated["optimizer_mb"], estimated["activations_mb"]
    if strategy == "ddp":
        parts = {"weights_mb": weights, "trainable_and_grads_mb": trainable_grads, "optimizer_mb": optimizer}
    elif strategy == "zero2":  # trainable weights stay whole; their gradients and AdamW moments are split
        parts = {"weights_mb": weights, "trainable_and_grads_mb": trainable_grads / 2 * (1 + 1 / processes),
                 "optimizer_mb": optimizer / processes}
    else:
        gathered = (weights + trainable_grads / 2) / max(estimated.get("layers") or 1, 1)
        parts = {"weights_mb": weights / processes + gathered, "trainable_and_grads_mb": trainable_grads / processes,
                 "optimizer_mb": optimizer / processes}
    parts["activations_mb"] = activations
    parts["total_mb"] = sum(parts.values())
    return {key: round(value) for key, value in parts.items()}
