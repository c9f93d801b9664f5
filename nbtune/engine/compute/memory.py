"""Memory readings: process RSS now and its peak over a run, plus CUDA counters when a GPU is used.

The peak is sampled by a background thread every 50 ms, because the high-water mark of a training step
is inside backward, where no callback runs; `ru_maxrss` would not do either, since it never resets and a
kernel's earlier runs would leak into this run's number.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import psutil

MB = 1024 * 1024


def rss_mb() -> float:
    """Resident memory of this process, in MiB."""
    return psutil.Process().memory_info().rss / MB


def cuda_mb() -> dict[str, float]:
    """Allocated, reserved and peak-allocated CUDA memory in MiB; empty without a GPU."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {
        "cuda_allocated_mb": torch.cuda.memory_allocated() / MB,
        "cuda_reserved_mb": torch.cuda.memory_reserved() / MB,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / MB,
    }


def cuda_peak() -> dict[str, float]:
    """`cuda_peak_mb`, the most CUDA memory allocated since the run began (see PeakSampler); empty without
    a GPU."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {"cuda_peak_mb": round(torch.cuda.max_memory_allocated() / MB, 1)}


class PeakSampler:
    """Context manager that tracks the peak RSS while its block runs (and restarts CUDA's peak counter)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak_mb = rss_mb()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakSampler:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()  # this run's peak, not the kernel's earlier runs'
        self._thread = threading.Thread(target=self._sample, name="nbtune-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.observe()

    def observe(self) -> float:
        """Take one reading now; returns the current RSS."""
        now = rss_mb()
        self.peak_mb = max(self.peak_mb, now)
        return now

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.observe()


def memory_split(model: Any) -> dict[str, float]:
    """Estimate of what a training model holds: frozen weights, trainable weights + their grads, and
    AdamW's two fp32 moments per trainable value. (Activations are what RSS holds beyond these.)"""
    frozen = trainable_bytes = trainable_count = 0
    for param in model.parameters():
        size = param.numel() * param.element_size()
        if param.requires_grad:
            trainable_bytes += size
            trainable_count += param.numel()
        else:
            frozen += size
    return {"weights_mb": frozen / MB, "trainable_mb": 2 * trainable_bytes / MB,
            "optimizer_mb": 8 * trainable_count / MB}


def count_parameters(model: Any) -> dict[str, Any]:
    """Trainable and total parameter counts; 4-bit weights count as their unpacked size."""
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if type(param).__name__ == "Params4bit":
            count *= 2  # two 4-bit values per stored byte (what peft reports as well)
        total += count
        if param.requires_grad:
            trainable += count
    return {"trainable_params": trainable, "total_params": total,
            "trainable_percent": round(100 * trainable / total, 4) if total else 0.0}


# ---------------------------------------------------------------- memory freed but still held by the process
def give_back_to_os() -> float:
    """Return what Python, the C allocator and CUDA hold freed; the MiB of resident memory that gave back.

    glibc keeps freed memory for reuse instead of returning it, in one arena per thread that allocated: a run
    or sweep trained on a background thread leaves its freed tensors' pages in its own arena, on top of the
    main thread's, and RSS only grows. Reference cycles are collected first, then malloc_trim(0) releases the
    free pages of every arena (not only the top of the main heap). Tens of milliseconds per GB held."""
    import gc

    before = rss_mb()
    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): those allocators give memory back lazily
        pass
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    return max(before - rss_mb(), 0.0)
