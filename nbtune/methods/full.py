"""Full fine-tuning and freeze-tuning: training the model's own weights, no adapter.

`full` trains every weight; `freeze` trains only the top `trainable_layers` decoder layers and any
parameter whose name contains one of `trainable_modules` (LLaMA-Factory's "freeze" method). Both save a
complete safetensors model, since the base weights change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nbtune.config.params import Param
from nbtune.errors import MethodError
from nbtune.methods.common import as_names, decoder_layers, refuse_unmatched
from nbtune.methods.registry import MethodContext, MethodSpec, register_method

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from nbtune.config import RunConfig


def _prepare_full(model: PreTrainedModel, ctx: MethodContext) -> PreTrainedModel:
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def _prepare_freeze(model: PreTrainedModel, ctx: MethodContext) -> PreTrainedModel:
    top = ctx.options["trainable_layers"]
    patterns = as_names(ctx.options["trainable_modules"])
    prefixes: tuple[str, ...] = ()
    if top:
        stack, count = decoder_layers(model)
        if top > count:
            raise MethodError(f"`trainable_layers` is {top}, but this model has {count} decoder layers; "
                              f"use 1 to {count} (or method: full to train every weight).",
                              field="trainable_layers")
        prefixes = tuple(f"{stack}.{i}." for i in range(count - top, count))
    _check_trainable_modules(model, patterns)
    trained = []
    for name, param in model.named_parameters():
        train = name.startswith(prefixes) if prefixes else False
        train = train or any(p in name for p in patterns)
        param.requires_grad_(train)
        if train:
            trained.append(name)
    if not trained:
        raise MethodError(
            f"`trainable_modules` {patterns} matches no parameter name; names look like "
            f"{', '.join(n for n, _ in list(model.named_parameters())[:4])}.",
            field="trainable_modules",
        )
    return model


def _check_trainable_modules(model: PreTrainedModel, patterns: list[str]) -> None:
    # A name that is part of no parameter name trains nothing, silently, beside the top layers (or beside
    # the other names): refuse it, as target lists are refused.
    names = [n for n, _ in model.named_parameters()]  # a tied lm_head is not among them: it trains as embed
    missing = [p for p in patterns if not any(p in n for n in names)]
    if missing:
        owners = sorted({n.rsplit(".", 2)[-2] for n in names if "." in n})
        known = {part for n in names for part in n.split(".")} | {n.split(".", i)[-1] for n in names
                                                               for i in range(n.count(".") + 1)}
        refuse_unmatched(missing, "trainable_modules", known, f"Its parameters belong to: {', '.join(owners)} "
                         f"(names such as {names[0]}).", what="parameter name")


def _validate_freeze(options: dict[str, Any], config: RunConfig) -> None:
    if options["trainable_layers"] == 0 and not as_names(options["trainable_modules"]):
        raise MethodError(
            "freeze with `trainable_layers: 0` and no `trainable_modules` would train nothing; "
            "set trainable_layers >= 1 or name modules, e.g. trainable_modules: [norm].",
            field="trainable_layers",
        )


register_method(MethodSpec(
    name="full",
    summary="Full fine-tuning: every weight trains (most memory: weights + grads + 2x Adam state).",
    params=(),
    prepare=_prepare_full,
    default_lr=2e-5,
    quantization=("none",),
    trains_in_place=True,
    saves_as="transformers",
))

register_method(MethodSpec(
    name="freeze",
    summary="Freeze-tuning: only the top N decoder layers (and named modules) train.",
    params=(
        Param("trainable_layers", "int", 2, "How many of the top decoder layers train.", min=0),
        Param("trainable_modules", "names", [], "Also train parameters whose names contain any of these, "
              "e.g. [norm, embed_tokens]."),
    ),
    prepare=_prepare_freeze,
    default_lr=5e-5,
    quantization=("none",),
    trains_in_place=True,
    saves_as="transformers",
    validate=_validate_freeze,
))
