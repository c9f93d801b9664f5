"""Out of memory, before and during a run: refuse what cannot fit, end cleanly what runs out.

Before the first step (the base is loaded, the data tokenised): the memory training still needs -
trainable weights and their gradients, AdamW's two moments, and activations for the longest batch in
the data - against what the machine (or its container: Binder's limit is a cgroup) has left. A run
that cannot fit is refused with the numbers and what to change; `memory_check: false` tries anyway.
During the run, an allocator failure becomes the same advice instead of a traceback, and the memory
the step held is collected.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

import psutil

from nbtune.errors import NbtuneError
from nbtune.methods import all_methods, get_method

MB = 2**20
# Activations kept for backward: ~34 values per token, hidden unit and layer (Korthikanti et al. 2022).
ACTIVATION_VALUES = 34


class OutOfMemory(NbtuneError):
    """The run does not fit in memory (pre-flight) or ran out of it (allocator failure)."""


def available_mb() -> float:
    """Memory this process can still get: the machine's available memory, or the container's limit minus
    its usage when a cgroup limit is lower (psutil sees the host, not the container)."""
    free = psutil.virtual_memory().available / MB
    limit, used = _cgroup_limit_and_usage()
    if limit is not None and used is not None:
        free = min(free, (limit - used) / MB)
    return free


def _cgroup_limit_and_usage(root: Path = Path("/sys/fs/cgroup")) -> tuple[int | None, int | None]:
    """(limit, usage) in bytes of this container's memory cgroup (v2, then v1); (None, None) if unlimited."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            limit = (root / limit_file).read_text().strip()
            used = int((root / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # "max" or a huge number: no limit
            return int(limit), used
    return None, None


def training_memory_mb(trainable: int, hidden: int, layers: int, tokens: int, value_bytes: int, *,
                       checkpointing: bool = False) -> dict[str, float]:
    """What training adds on top of the weights, in MB: trainable weights + their gradients, AdamW's two
    moments, and the activations kept for backward of `tokens` tokens (shared with `estimate`)."""
    per_layer = tokens * hidden * ACTIVATION_VALUES * value_bytes
    # Checkpointing keeps each layer's input and recomputes one layer at a time in backward.
    activations = tokens * hidden * layers * value_bytes + per_layer if checkpointing else per_layer * layers
    return {"trainable_and_grads_mb": trainable * 8 / MB, "optimizer_mb": trainable * 8 / MB,
            "activations_mb": activations / MB}


def training_need_mb(model: Any, config: Any, longest: int, *,
                     gradient_checkpointing: bool | None = None) -> dict[str, float]:
    """What training adds on top of the loaded weights, in MB (an upper bound: the longest batch), with the
    config's gradient checkpointing, or as `gradient_checkpointing` says."""
    hidden = getattr(model.config, "hidden_size", 0) or getattr(model.config, "n_embd", 0)
    layers = getattr(model.config, "num_hidden_layers", 0) or getattr(model.config, "n_layer", 0)
    need = training_memory_mb(sum(p.numel() for p in model.parameters() if p.requires_grad), hidden, layers,
                              tokens=config.batch_size * min(longest, config.max_length),
                              value_bytes=2 if config.precision in ("bf16", "fp16") else 4,
                              checkpointing=config.gradient_checkpointing if gradient_checkpointing is None
                              else gradient_checkpointing)
    need["total_mb"] = sum(need.values())
    return need


def check_fits(model: Any, config: Any, longest: int) -> dict[str, float]:
    """Raise `OutOfMemory` when training `model` as `config` says cannot fit in what is left. A run that
    fits only with gradient checkpointing, which the user left to nbtune, gets it: the estimate then
    carries `checkpointing_chosen`, and the caller trains with `config.with_changes(gradient_checkpointing=True,
    derived=True)` (a config does not change in place)."""
    need = training_need_mb(model, config, longest)
    sharing = processes_sharing_memory()
    have = device_available_mb() / sharing
    if need["total_mb"] > have and "gradient_checkpointing" in config.derived and not config.gradient_checkpointing:
        with_it = training_need_mb(model, config, longest, gradient_checkpointing=True)
        if with_it["total_mb"] <= have:
            return {**with_it, "available_mb": have, "checkpointing_chosen": 1.0}
    if config.memory_check and need["total_mb"] > have:
        each = f" to each of the {sharing} processes sharing this machine's memory" if sharing > 1 else ""
        raise OutOfMemory(
            f"this run needs about {need['total_mb']:,.0f} MB more (activations {need['activations_mb']:,.0f}, "
            f"trainable + grads {need['trainable_and_grads_mb']:,.0f}, optimizer {need['optimizer_mb']:,.0f}) "
            f"but only {have:,.0f} MB are available{each}. {advice(config)} Or set `memory_check: false` to try "
            "anyway.", field="batch_size")
    return {**need, "available_mb": have}


def device_available_mb() -> float:
    """What the device that trains can still hold: a GPU's free memory, else the machine's (see above)."""
    from nbtune.engine.compute import device

    if device.current().memory == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0] / MB
    return available_mb()


def processes_sharing_memory() -> int:
    """How many processes of this run draw on this machine's RAM at once: the launcher's local world size
    on CPU (each trains its own activations, optimizer state and adapter copy); on GPUs each has its own."""
    import torch

    if torch.cuda.is_available():
        return 1
    return max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)


def advice(config: Any) -> str:
    """What to change so a run needs less memory, from the run's settings and what its method declares."""
    ideas = [f"`batch_size: {max(config.batch_size // 2, 1)}`"
             + (f" with `grad_accum: {config.grad_accum * 2}`" if config.batch_size > 1 else "")]
    if not config.gradient_checkpointing:
        ideas.append("`gradient_checkpointing: true`")
    if config.max_length > 256:
        ideas.append(f"`max_length: {config.max_length // 2}`")
    if config.quantization == "none" and "4bit" in get_method(config.method).quantization:
        ideas.append("`quantization: 4bit` (a 4-bit base)")
    lighter = [m.name for m in all_methods() if m.few_parameters and m.name != config.method]
    if lighter:
        ideas.append(f"a lighter method ({', '.join(lighter)})")
    if len(ideas) == 1:
        return f"Try {ideas[0]}."
    return "Try " + ", ".join(ideas[:-1]) + " or " + ideas[-1] + "."


def is_allocator_failure(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def out_of_memory(config: Any, step: int) -> OutOfMemory:
    """The error a run ends with when the allocator failed, after giving the step's memory back."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return OutOfMemory(f"ran out of memory at step {step + 1}. {advice(config)}", field="batch_size")


__all__ = ["OutOfMemory", "available_mb", "check_fits", "is_allocator_failure", "out_of_memory",
           "processes_sharing_memory", "training_memory_mb", "training_need_mb"]
