"""BitFit (Ben Zaken et al. 2022): train only the bias terms of the base model.

Many current models (Llama, SmolLM2, Mistral) have no biases at all; there BitFit would train nothing,
so it refuses and names the methods of similar size that do work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nbtune.errors import MethodError
from nbtune.methods import partial
from nbtune.methods.registry import MethodContext, MethodSpec, register_method

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def bias_names(model: PreTrainedModel) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.endswith(".bias") or n == "bias"]


def _prepare(model: PreTrainedModel, ctx: MethodContext) -> PreTrainedModel:
    names = bias_names(model)
    if not names:
        kind = getattr(model.config, "model_type", type(model).__name__)
        raise MethodError(
            f"bitfit trains bias terms, and this {kind} model has none (attention_bias and mlp_bias are off), "
            "so it would train nothing. Use `ia3` (scaling vectors, similarly tiny) or `ln_tuning` instead.",
            field="method",
        )
    return partial.train_only(model, names)


register_method(MethodSpec(
    name="bitfit",
    summary="BitFit: only the bias terms train (models with biases: GPT-2, BERT-style, Qwen2 attention).",
    params=(),
    prepare=_prepare,
    default_lr=1e-3,
    quantization=("none",),
    trains_in_place=True,
    saves_as="trained_tensors",
    save=partial.save,
    load=partial.load,
    disable=partial.original_restored,
))
