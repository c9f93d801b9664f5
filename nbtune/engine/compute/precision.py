"""How a run computes: bf16 autocast where the hardware runs bf16 matmuls fast, fp32 elsewhere, and the
two CPU fixes that make bf16 LoRA steps pay off (both measured in `bench/throughput.py`).

On CPUs with AVX512-BF16 / AMX a bf16 matmul measures ~5.5x an fp32 one (`bench/roofline.py`), so
`precision` defaults to bf16 there: the Trainer's own mixed precision (`bf16=True`, an autocast around
the forward), with the weights the optimizer updates kept in fp32. Methods that keep the base frozen
then also store it in bf16 (half the weight memory, no per-step casts of frozen weights).

    >>> default_precision("none") in ("bf16", "fp16", "fp32")
    True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import torch
from torch import nn

from nbtune.engine.compute import device


def default_precision(quantization: str) -> str:
    """The device policy's precision (engine/compute/device.py): bf16 where it is native, fp16 on GPUs without
    bf16, else fp32; a quantized base as bitsandbytes computes it on this device (fp32 on CPUs)."""
    policy = device.current()
    return policy.quantized_precision if quantization != "none" else policy.precision


def default_dtype(precision: str, frozen_base: bool, quantization: str) -> str:
    """Storage dtype of the base (see `DevicePolicy.base_dtype`)."""
    return device.current().base_dtype(precision, frozen_base, quantization)


# ---------------------------------------------------------------- CPU speed-ups while training
class FastDropout(nn.Dropout):
    """`nn.Dropout` with a mask drawn 4x cheaper on CPU; elsewhere (and in eval mode) plain dropout.

    Hand-written because nothing maintained offers it: on CPU, torch's dropout draws one 32-bit random
    number per element (`bernoulli_`), 17% of a LoRA step on SmolLM2 with peft's default dropout.
    Here one 64-bit draw gives four 16-bit uniforms, so `p` is rounded to a multiple of 1/65536 (at most
    7.6e-6 away) and kept elements are scaled by the exact 1 / (1 - rounded p): the output's expectation
    is the input, as with `nn.Dropout`. The backward pass keeps a one-byte mask, as torch's does.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropped = round(self.p * 65536)
        if not self.training or x.device.type != "cpu" or dropped in (0, 65536) or self.inplace:
            return super().forward(x)
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)  # the full int64 range
        keep = bits.view(torch.int16)[:n].view(x.shape) >= dropped - 32768
        return _ScaleKept.apply(x, keep, 65536 / (65536 - dropped))


class _ScaleKept(torch.autograd.Function):
    """x * keep * scale, saving only the boolean mask for the backward pass."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None, None


FP32_ATTENTION = "nbtune_sdpa_fp32_backward"


def _sdpa_fp32_when_training(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any) -> Any:
    """transformers' SDPA attention, run in fp32 when bf16 gradients are wanted on CPU: torch's bf16 CPU
    attention backward measured 5.7x slower than fp32 (600 vs 106 ms a step) while the forward is no faster."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    if query.device.type == "cpu" and torch.is_grad_enabled() and (autocast_bf16 or query.dtype == torch.bfloat16):
        with torch.autocast("cpu", enabled=False):  # autocast would cast the inputs straight back to bf16
            return sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                          *args, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


@cache
def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(FP32_ATTENTION, _sdpa_fp32_when_training)
    # Without a mask function of the same name transformers builds no mask at all (no causal, no padding).
    ALL_MASK_ATTENTION_FUNCTIONS.register(FP32_ATTENTION, sdpa_mask)


@contextmanager
def training_speedups(model: nn.Module, *, dropout: bool = True, attention: bool = True,
                      fp32_sums: bool = True) -> Iterator[None]:
    """What a run's model gets while it trains (each part measured in `bench/speedups.py`):

    - `fp32_sums`: under bf16 autocast, frozen layers hand their outputs on in fp32, so an adapter's small
      contribution is added in fp32 instead of rounding away in a bf16 sum;
    - `dropout`: `FastDropout` for peft's LoRA dropout;
    - `attention`: fp32 SDPA when bf16 gradients are wanted.

    Each applies where the device policy says (engine/compute/device.py: on CPUs; a GPU trains without them)
    and the keyword leaves it on; all are undone on exit, so the model that is saved, merged or compared
    afterwards is plain peft / transformers (no nbtune class, hook or attention name ends up in it).
    """
    policy = device.current()
    on_cpu = next(model.parameters()).device.type == "cpu"
    undo_liger = _liger_kernels(model) if policy.liger_kernels and not on_cpu else []
    hooks = _upcast_frozen_outputs(model) if fp32_sums and policy.fp32_sums else []
    swapped = _swap_lora_dropout(model) if dropout and policy.fast_dropout and on_cpu else []
    configs = _sdpa_configs(model) if attention and policy.fp32_attention_backward and on_cpu else []
    if configs:
        _register_attention()
    for config in configs:
        config._attn_implementation = FP32_ATTENTION
    try:
        yield
    finally:
        for config in configs:
            config._attn_implementation = "sdpa"
        for holder, key, original in swapped:
            holder[key] = original
        for hook in hooks:
            hook.remove()
        for module, attributes in undo_liger:
            for key in set(module.__dict__) - attributes:
                del module.__dict__[key]


def _liger_kernels(model: nn.Module) -> list[tuple[nn.Module, set[str]]]:
    """Liger's fused RMSNorm and SwiGLU Triton kernels on this model's own modules (never on the classes:
    another model in the process may train on a CPU), for Llama-style decoders; what to undo afterwards.
    Liger binds its kernels as instance attributes, so removing those attributes restores the modules."""
    try:
        from liger_kernel.transformers.monkey_patch import _patch_rms_norm_module, _patch_swiglu_module
        from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    except ImportError:  # not installed, or its layout changed: train without it
        return []
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    mlps = [m for m in model.modules() if all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and getattr(getattr(m, "config", None), "hidden_act", None) in ("silu", "swish")]
    before = [(m, set(m.__dict__)) for m in (*norms, *mlps)]
    for norm in norms:
        _patch_rms_norm_module(norm, eps=getattr(norm, "variance_epsilon", 1e-6))
    for mlp in mlps:
        _patch_swiglu_module(mlp, LigerSwiGLUMLP)
    return before


@contextmanager
def inference_precision(model: nn.Module) -> Iterator[None]:
    """Generation and evaluation with the numerics training used: on a model with bf16 weights,
    bf16 matmuls (autocast) whose outputs are summed in fp32. A plain forward of a bf16 model keeps the
    whole residual stream in bf16, which measured 9% higher held-out loss for the same adapter
    (bench/precision.py). Models without bf16 weights are left as they are."""
    params = list(model.parameters())
    if not any(p.dtype == torch.bfloat16 for p in params):
        yield
        return
    hooks = _upcast_frozen_outputs(model, frozen_only=False)  # no gradients here: every such layer
    try:
        with torch.autocast(params[0].device.type, dtype=torch.bfloat16):
            yield
    finally:
        for hook in hooks:
            hook.remove()


def _upcast_frozen_outputs(model: nn.Module, *, frozen_only: bool = True) -> list[Any]:
    """Forward hooks that return frozen Linear / Embedding outputs in fp32 while a bf16 autocast is on.

    Why: autocast makes `base_layer(x)` bf16, and peft adds `lora_B(lora_A(x)) * scaling` to it in bf16,
    whose 8-bit mantissa rounds away a contribution below ~0.4% of the base output: early in training
    (LoRA's B starts at zero) the adapter barely moves the loss. Measured on SmolLM2, 4 rows, lr 1e-4,
    8 steps: loss 0.68 -> 0.48 with plain autocast vs 0.68 -> 0.34 in fp32, and 0.67 -> 0.34 with this.
    The matmuls stay bf16; only their results (and the sums after them) are fp32.
    """
    hooks = []
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and not (frozen_only and any(
                p.requires_grad for p in module.parameters(recurse=False))):
            hooks.append(module.register_forward_hook(_fp32_under_autocast))
    return hooks


def _fp32_under_autocast(module: nn.Module, args: Any, output: Any) -> Any:
    if isinstance(output, torch.Tensor) and output.dtype in (torch.bfloat16, torch.float16) and \
            torch.is_autocast_enabled(output.device.type):
        return output.float()
    return output


def _swap_lora_dropout(model: nn.Module) -> list[tuple[nn.ModuleDict, str, nn.Module]]:
    swapped = []
    for module in model.modules():
        holder = getattr(module, "lora_dropout", None)
        if not isinstance(holder, nn.ModuleDict):
            continue
        for key, dropout in holder.items():
            if type(dropout) is nn.Dropout and dropout.p > 0:
                holder[key] = FastDropout(dropout.p)
                holder[key].train(dropout.training)
                swapped.append((holder, key, dropout))
    return swapped


def _sdpa_configs(model: nn.Module) -> list[Any]:
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    return [c for c in configs.values() if getattr(c, "_attn_implementation", None) == "sdpa"]


__all__ = ["FastDropout", "default_dtype", "default_precision", "inference_precision",
           "training_speedups"]
