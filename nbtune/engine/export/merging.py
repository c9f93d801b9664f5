"""Merging a run trained on a low-precision base (4-bit, 8-bit, bf16): into its base loaded afresh in fp32,
since merging into the low-precision weights would round much of the update away (`Run.merge_and_export`)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbtune.errors import NbtuneError

if TYPE_CHECKING:
    from nbtune.engine.records.run import Run


def holds_low_precision(model: Any) -> bool:
    """Whether the frozen weights are bf16/fp16 (what the run trained on, whatever its config says)."""
    import torch

    return any(p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters() if not p.requires_grad)


def check_base_reloadable(run: Run) -> None:
    """Merging a low-precision run reloads its base in fp32 from `config.model`: only if that is the model
    it trained on (a base passed in memory may be any model; merging into another would be wrong)."""
    if run.trained_on_a_base_in_memory:
        raise NbtuneError(
            f"run {run.name!r} trained on a base passed in memory ({run.base_name}), in low precision; "
            "merging needs that base's fp32 weights. Load them yourself and merge there: "
            "nbtune.load(run.save(path), base=(fp32_model, tokenizer)).merge_and_export(...).",
            field="model")


def full_precision_copy(run: Run) -> Any:
    """The run's trained model rebuilt on its base loaded in fp32: its adapter saved and loaded onto it."""
    from nbtune.engine.bases.loading import load_base

    base = load_base(run.config.model, quantization="none", dtype="float32")
    with tempfile.TemporaryDirectory(prefix="nbtune-merge-") as folder:
        if run.method.save is not None:
            run.method.save(run.model, Path(folder), run.context)
        else:
            run.model.save_pretrained(folder)
        return run.method.load_trained(base.model, Path(folder))


def merged_for_export(run: Run) -> Any:
    """The plain model an export writes: the run's weights when its method trained them in place, else its
    adapter merged into a copy (into a base reloaded in fp32 when the run's base is quantized or bf16, so
    the update is not rounded away). Neither the run nor the cached base it may share is changed.
    `merge_and_export` and the GGUF export both take this path."""
    run.require_model()
    if not run.method.adds_modules(run.config.options):
        return run.model  # full/freeze/bitfit: the weights are already the merged model
    if run.context.quantized or holds_low_precision(run.model):
        run.method.check_mergeable(run.config.options)  # before loading a base to merge into
        check_base_reloadable(run)
        return run.method.merged(full_precision_copy(run), run.config.options)
    return run.merge()
