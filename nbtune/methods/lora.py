"""LoRA and QLoRA: a trainable low-rank update B·A beside each target weight, done by peft.

`lora` trains on a full-precision base (or a quantized one when `quantization` is set); `qlora` is the
same adapter on a base loaded in 4-bit NF4 with double quantisation (or 8-bit). Options `rslora` and
`init: pissa` select the rank-stabilised scaling and the principal-singular-vector initialisation.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbtune.config.params import Param
from nbtune.errors import MethodError
from nbtune.methods.common import wrap_with_peft
from nbtune.methods.registry import MethodContext, MethodSpec, register_method

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from nbtune.config import RunConfig

# init -> peft's `init_lora_weights`; pissa and olora rewrite the base weights (the residual stays there).
_INITS: dict[str, Any] = {
    "default": True,
    "gaussian": "gaussian",
    "pissa": "pissa",
    "pissa_niter_4": "pissa_niter_4",
    "olora": "olora",
}
_REWRITES_BASE = ("pissa", "pissa_niter_4", "olora")

LORA_PARAMS = (
    Param("r", "int", 8, "LoRA rank: the size of the low-rank update.", min=1, max=4096),
    Param("alpha", "float", 16.0, "Scale numerator: updates are scaled by alpha/r (alpha/sqrt(r) with rslora).",
          min=0.0, min_exclusive=True),
    Param("dropout", "float", 0.05, "Dropout on the LoRA input during training.", min=0.0, max=1.0,
          max_exclusive=True),
    Param("target_modules", "names", "all-linear",
          "Modules that get LoRA: 'all-linear', or module names such as [q_proj, v_proj]."),
    Param("rslora", "bool", False, "Rank-stabilised scaling alpha/sqrt(r): keeps large ranks learning."),
    Param("init", "str", "default", "Adapter initialisation: default (B=0), gaussian, pissa (principal "
          "singular vectors; pissa_niter_4 is the fast SVD), olora.", choices=tuple(_INITS)),
)


def lora_config(options: dict[str, Any], **extra: Any) -> Any:
    """The peft `LoraConfig` for validated LoRA options (`extra`: more LoraConfig fields, e.g. use_dora)."""
    from peft import LoraConfig

    return LoraConfig(
        **extra,
        r=options["r"],
        lora_alpha=options["alpha"],
        lora_dropout=options["dropout"],
        target_modules=options["target_modules"],
        use_rslora=options["rslora"],
        init_lora_weights=_INITS[options["init"]],
        task_type="CAUSAL_LM",
    )


def prepare_lora(model: PreTrainedModel, ctx: MethodContext, **extra: Any) -> PreTrainedModel:
    """LoRA (or a variant: `extra` goes to LoraConfig) on `model`, saving PiSSA's initial adapter if needed."""
    options = ctx.options
    peft_model = wrap_with_peft(model, lora_config(options, **extra), ctx)
    if options["init"] in _REWRITES_BASE:
        _save_initial_adapter(peft_model, ctx)
    return peft_model


def _save_initial_adapter(peft_model: Any, ctx: MethodContext) -> None:
    # PiSSA/OLoRA move part of the base weights into the adapter. Keeping the adapter as it was before
    # training lets `save` convert the result into a plain LoRA that applies to the *original* base, so
    # `PeftModel.from_pretrained(base, dir)` reproduces the trained model (peft's documented recipe).
    initial = ctx.workdir / "initial_adapter"
    config = peft_model.peft_config["default"]
    config.init_lora_weights = True  # the saved copy must not redo the SVD when peft reloads it
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*changes the base weights.*")  # we convert, as it advises
        peft_model.save_pretrained(str(initial))
    config.init_lora_weights = _INITS[ctx.options["init"]]


def _prepare(model: PreTrainedModel, ctx: MethodContext) -> PreTrainedModel:
    return prepare_lora(model, ctx)


def save_lora(model: Any, path: Path, ctx: MethodContext) -> None:
    if ctx.options["init"] in _REWRITES_BASE:
        model.save_pretrained(
            str(path), path_initial_model_for_weight_conversion=str(ctx.workdir / "initial_adapter")
        )
    else:
        model.save_pretrained(str(path))


def validate_lora(options: dict[str, Any], config: RunConfig) -> None:
    if options["init"] in _REWRITES_BASE and config.quantization != "none":
        raise MethodError(
            f"`init: {options['init']}` rewrites the base weights, which cannot be done on a "
            f"{config.quantization} base; use `init: default` or `quantization: none`.",
            field="init",
        )


def rewrites_base(options: dict[str, Any]) -> bool:
    return options["init"] in _REWRITES_BASE


def weightless_options(options: dict[str, Any]) -> dict[str, Any]:
    # Any init trains the same matrices; the SVD-based ones cannot run on weightless (meta) tensors.
    return {**options, "init": "default"}


def disable_lora(model: Any) -> Any:
    init = str(model.peft_config[model.active_adapter].init_lora_weights)
    if init.startswith(_REWRITES_BASE):
        raise MethodError(f"`init: {init}` moved part of the base weights into the adapter, so switching the "
                          "adapter off does not give the base model; load the base again to compare.",
                          field="init")
    return model.disable_adapter()


def register_lora_family(name: str, summary: str, prepare: Any = None, **extra: Any) -> MethodSpec:
    """Register a LoRA variant: LoRA's options, saving (PiSSA conversion), checks and switch-off."""
    fields: dict[str, Any] = {"params": LORA_PARAMS, "default_lr": 2e-4, "save": save_lora,
                              "validate": validate_lora, "disable": disable_lora, "rewrites_base": rewrites_base,
                              "weightless_options": weightless_options, "merges": True, **extra}
    return register_method(MethodSpec(name=name, summary=summary, prepare=prepare or _prepare, **fields))


register_lora_family("lora", "Low-rank adapters beside the frozen weights (Hu et al. 2021); rslora and PiSSA init "
                     "as options.")
register_lora_family("qlora", "LoRA on a base quantized to 4-bit NF4 with double quantisation (or 8-bit) by "
                     "bitsandbytes.", default_quantization="4bit", quantization=("4bit", "8bit"))
