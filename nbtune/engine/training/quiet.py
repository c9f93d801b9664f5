"""Keeping library chatter out of a notebook cell: per-load progress bars and repeated log lines."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def no_hf_progress_bars() -> Iterator[None]:
    """transformers draws a bar per load and per save ("Loading weights", "Writing model shards"), and its GGUF
    reader one of its own ("Converting and de-quantizing GGUF tensors...", a tqdm.auto widget that a saved
    notebook cannot show again), which its progress-bar switch does not reach."""
    from transformers import modeling_gguf_pytorch_utils as gguf_reader
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    reader_bar = getattr(gguf_reader, "tqdm", None)
    if reader_bar is not None:
        gguf_reader.tqdm = _no_bar
    try:
        yield
    finally:
        if reader_bar is not None:
            gguf_reader.tqdm = reader_bar
        if was_enabled:
            hf_logging.enable_progress_bar()


def _no_bar(iterable: Any = None, *args: Any, **kwargs: Any) -> Any:
    return iterable


class _DropBitsandbytesNoise(logging.Filter):
    # At import (peft imports bitsandbytes) it says its fast CPU 4-bit kernel would come from a hub:
    # offline that is always so, and LoRA users do not care. 8-bit layers log a dtype cast on every
    # forward call: hundreds of identical lines per step.
    NOISE = ("kernels-community", "inputs will be cast from")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in self.NOISE)


def install_log_filters() -> None:
    # peft (mixed batches, merges, k-bit copies) reads transformers' renamed `is_gradient_checkpointing`
    # property, which warns on every read: their notice, about their code, in the user's cell.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    for name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropBitsandbytesNoise) for f in logger.filters):
            logger.addFilter(_DropBitsandbytesNoise())
