"""Every choice that depends on the hardware, made in one place from a plain description of the device.

`Device` says what the machine is (CPU with or without native bf16, a CUDA GPU and its compute capability,
Apple `mps`); `policy_for(device)` turns it into a `DevicePolicy` that the rest of the engine reads:
precision and autocast, the frozen base's storage dtype, bitsandbytes' compute dtype, the attention
implementation, which speed-ups apply, the padding multiple, and how memory is counted. Both are plain
dataclasses, so tests describe a T4 or an H100 on a CPU machine and check the choices.

    >>> policy_for(Device("cuda", bf16=True, fp16=True, capability=(9, 0))).precision
    'bf16'
    >>> policy_for(Device("cuda", fp16=True, capability=(7, 5))).precision     # a T4: no bf16
    'fp16'

| device | precision | frozen base | 4-bit compute | quantized precision | speed-ups | pad | memory |
|---|---|---|---|---|---|---|---|
| CPU without AVX512-BF16/AMX | fp32 | float32 | float32 | fp32 | fast dropout | - | RSS |
| CPU with AVX512-BF16 or AMX | bf16 | bfloat16 | float32 | fp32 | fp32 sums, dropout, fp32 SDPA backward | - | RSS |
| CUDA, bf16 (compute capability >= 8.0) | bf16 | bfloat16 | bfloat16 | bf16 | - | 8 | CUDA |
| CUDA, fp16 only (7.x: T4, V100) | fp16 + loss scaling | float16 | float16 | fp16 | - | 8 | CUDA |
| CUDA, older | fp32 | float32 | float32 | fp32 | - | 8 | CUDA |
| Apple mps | fp32 | float32 | (no bitsandbytes) | fp32 | - | - | RSS |

Why each choice is what it is, with the measurement behind it, is said next to it below.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cache
from typing import Any


@dataclass(frozen=True)
class Device:
    """What the policy needs to know about the hardware."""

    type: str  # "cpu", "cuda" or "mps"
    name: str = ""
    bf16: bool = False  # native bf16 matmuls: CUDA compute capability >= 8.0; CPU AVX512-BF16 or AMX
    fp16: bool = False  # fp16 tensor cores: CUDA compute capability >= 7.0
    capability: tuple[int, int] | None = None  # CUDA compute capability
    memory_mb: float | None = None  # the device's memory (GPU); None on CPU (RAM is read when needed)
    flash_attention: bool = False  # the flash-attn package is installed and this GPU runs it (>= 8.0)
    liger: bool = False  # the liger-kernel package (Triton kernels) is installed, for a CUDA GPU


@dataclass(frozen=True)
class DevicePolicy:
    """The engine's hardware-dependent choices; read, never re-derived, by models, trainer and panel."""

    device: Device
    precision: str  # compute precision of a full-precision base: "bf16" | "fp16" | "fp32" (autocast)
    quantized_precision: str  # the same for a 4-bit / 8-bit base
    frozen_dtype: str  # storage dtype of a frozen base computed in `precision` ("float32" when fp32)
    quantized_compute_dtype: str  # bitsandbytes' bnb_4bit_compute_dtype
    attention: str  # transformers' attn_implementation for training
    fp32_sums: bool  # frozen layers hand their outputs on in fp32 under autocast (precision.py)
    fast_dropout: bool  # nbtune's cheaper LoRA dropout mask (CPU only: torch draws one fp32 per element)
    fp32_attention_backward: bool  # SDPA in fp32 when bf16 gradients are wanted (torch's CPU bf16 backward)
    liger_kernels: bool  # Liger's fused RMSNorm / SwiGLU Triton kernels (installed, and chosen: see policy_for)
    pad_to_multiple_of: int | None  # batch length rounded up to this (tensor-core shapes)
    memory: str  # what memory readings count: "rss" or "cuda"
    gradient_checkpointing_when_quantized: bool  # a 4-/8-bit run recomputes activations unless told not to

    @property
    def accelerator(self) -> bool:
        return self.device.type != "cpu"

    def refuse_precision(self, precision: str) -> str | None:
        """Why this device cannot compute in `precision` (None when it can)."""
        if precision == "bf16" and self.device.type == "cuda" and not self.device.bf16:
            return (f"this GPU ({self.device.name or 'compute capability ' + str(self.device.capability)}) has no "
                    "bf16; use `precision: fp16` (with loss scaling) or fp32.")
        if precision == "fp16" and self.device.type != "cuda":
            return f"fp16 mixed precision needs a CUDA GPU; on {self.device.type} use bf16 or fp32."
        return None

    def trainer_precision(self, precision: str) -> dict[str, bool]:
        """TrainingArguments' mixed-precision flags for a run computing in `precision` (fp16 brings the
        Trainer's loss scaling with it)."""
        return {"bf16": precision == "bf16", "fp16": precision == "fp16"}

    def base_dtype(self, precision: str, frozen_base: bool, quantization: str) -> str:
        """Storage dtype of the base: low precision only when it is frozen and computed in that precision
        anyway. Weights that train stay fp32 (bf16 weights lose small updates: the optimizer needs fp32
        masters); a quantized base's other weights (norms, embeddings) are kept in the compute dtype."""
        if quantization != "none":
            return self.quantized_compute_dtype
        low = {"bf16": "bfloat16", "fp16": "float16"}.get(precision)
        return low if low is not None and frozen_base else "float32"


def policy_for(device: Device) -> DevicePolicy:
    """The choices for `device` (a pure function: see the module's table)."""
    if device.type == "cuda":
        precision = "bf16" if device.bf16 else "fp16" if device.fp16 else "fp32"
        dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]
        return DevicePolicy(
            device=device, precision=precision,
            # bitsandbytes' CUDA kernels compute 4-bit layers in bf16/fp16; fp32 (nbtune's CPU choice) doubled
            # the activations QLoRA is chosen to save (33.4 GB vs 28.2 GB for bf16 LoRA at the 1.7B shape).
            quantized_precision=precision, frozen_dtype=dtype, quantized_compute_dtype=dtype,
            attention="flash_attention_2" if device.flash_attention else "sdpa",
            # fp32 sums make every frozen layer's output fp32: at the 1.7B shape on an H200 they cost 0.844x vs
            # 0.964x the hand-written job's tokens/s and 1.137x vs 0.900x its CUDA peak (final loss 3.18 vs 3.22
            # after 12 steps of a random-init model: one pair, not a measured difference).
            fp32_sums=False, fast_dropout=False, fp32_attention_backward=False,
            # Measured at the 1.7B shape on an H200 (bench/gpu_throughput.py): Liger's RMSNorm + SwiGLU took
            # the CUDA peak from 17.4 to 15.0 GB but tokens/s from 0.964x to 0.873x the hand-written job's
            # (SwiGLU recomputes in backward); off, since speed is what this path is for.
            liger_kernels=False,
            pad_to_multiple_of=8,  # NVIDIA's guidance for fp16/bf16 tensor cores
            memory="cuda",
            # what QLoRA is chosen for is memory; peft's prepare_model_for_kbit_training defaults to it too
            gradient_checkpointing_when_quantized=True,
        )
    if device.type == "mps":
        # bf16 autocast on mps depends on the macOS version and torch's coverage; fp32 trains everywhere.
        return DevicePolicy(device=device, precision="fp32", quantized_precision="fp32", frozen_dtype="float32",
                            quantized_compute_dtype="float32", attention="sdpa", fp32_sums=False,
                            fast_dropout=False, fp32_attention_backward=False, liger_kernels=False,
                            pad_to_multiple_of=None, memory="rss", gradient_checkpointing_when_quantized=False)
    # CPU: bf16 only with native bf16 matmuls (~5.5x fp32's, bench/roofline.py); bitsandbytes' CPU kernels
    # are fp32-tested, so quantized bases compute in fp32. Padding to a multiple of 8 measured slower on CPU
    # (bench/speedups.py: more padded tokens, no faster kernels).
    bf16 = device.bf16
    return DevicePolicy(
        device=device, precision="bf16" if bf16 else "fp32", quantized_precision="fp32",
        frozen_dtype="bfloat16" if bf16 else "float32", quantized_compute_dtype="float32", attention="sdpa",
        fp32_sums=bf16,  # bench/precision.py: plain bf16 sums rounded early LoRA updates away (loss 0.48 vs 0.34)
        fast_dropout=True, fp32_attention_backward=bf16, liger_kernels=False, pad_to_multiple_of=None,
        memory="rss", gradient_checkpointing_when_quantized=False,
    )


def detect() -> Device:
    """This machine: the first CUDA GPU if any, else Apple mps, else the CPU."""
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        props = torch.cuda.get_device_properties(0)
        # Native bf16 tensor cores from Ampere (8.0) on; torch's is_bf16_supported also counts emulation.
        return Device("cuda", name=props.name, bf16=major >= 8, fp16=major >= 7, capability=(major, minor),
                      memory_mb=props.total_memory / 2**20, flash_attention=major >= 8 and _installed("flash_attn"),
                      liger=_installed("liger_kernel"))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return Device("mps", name="Apple mps")
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return Device("cpu", name="cpu", bf16=any(getattr(cpu, name, lambda: False)() for name in checks))


@cache
def current() -> DevicePolicy:
    """The policy of the device this process trains on (detected once)."""
    return policy_for(detect())


def with_changes(policy: DevicePolicy, **changes: Any) -> DevicePolicy:
    """`policy` with some choices changed (benchmarks measure one speed-up at a time this way)."""
    return dataclasses.replace(policy, **changes)


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


__all__ = ["Device", "DevicePolicy", "current", "detect", "policy_for", "with_changes"]
