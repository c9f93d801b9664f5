"""Saving and restoring a method that trains a few of the base model's own tensors in place.

BitFit (biases) and MoE router tuning change only a sliver of the base; saving the whole model for
them would waste hundreds of megabytes. These helpers save just the trained tensors (safetensors),
load them onto a fresh base, and keep the original values so the base can be switched back on.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbtune.errors import MethodError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

WEIGHTS_FILE, CONFIG_FILE = "trained_tensors.safetensors", "trained_tensors.json"


def train_only(model: PreTrainedModel, names: list[str], *, keep_originals: bool = True) -> PreTrainedModel:
    """Freeze everything but `names`; with `keep_originals`, copy their values for `original_restored`."""
    wanted = set(names)
    model._nbtune_originals = {}
    for name, param in model.named_parameters():
        param.requires_grad_(name in wanted)
        if name in wanted and keep_originals:
            model._nbtune_originals[name] = param.detach().clone()
    return model


def save(model: PreTrainedModel, path: Path, ctx: Any = None) -> None:
    from safetensors.torch import save_file

    trained = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trained, str(path / WEIGHTS_FILE))
    method = ctx.config.method if ctx is not None else None
    (path / CONFIG_FILE).write_text(json.dumps({"method": method, "tensors": sorted(trained)}, indent=2) + "\n")


def load(base_model: PreTrainedModel, path: Path) -> PreTrainedModel:
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(Path(path) / WEIGHTS_FILE))
    params = dict(base_model.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise MethodError(f"{path} holds tensors this model lacks, e.g. {unknown[0]}; wrong base model?",
                          field="model")
    train_only(base_model, list(weights))
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    return base_model


@contextlib.contextmanager
def original_restored(model: PreTrainedModel) -> Iterator[None]:
    """Inside the block the trained tensors hold their original values again."""
    import torch

    originals = getattr(model, "_nbtune_originals", None)
    if not originals:
        raise MethodError("this run trained base weights in place without keeping the originals "
                          "(too large to copy); load the base model again to compare.")
    params = dict(model.named_parameters())
    trained = {n: params[n].detach().clone() for n in originals}
    with torch.no_grad():
        for name, value in originals.items():
            params[name].copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in trained.items():
                params[name].copy_(value)
