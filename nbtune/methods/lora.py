"""LoRA and QLoRA: a trainable low-rank update B·A beside each target weight, done by peft.

`lora` trains on a full-precision base (or a quantized one when `quantization` is set); `qlora` is the
same adapter on a base loaded in 4-bit NF4 with double quantisation (or 8-bit). Options `rslora` and
`init: pissa` select the rank-stabilised scaling and the principal-singular-vector initialisation.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbtune.errors import MethodError
from nbtune.methods.registry import MethodContext, MethodSpec, register_method
from nbtune.params import Param

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


def linear_module_names(model: PreTrainedModel) -> list[str]:
    """Short names of the model's linear layers (what `target_modules` can name)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    return sorted(names)


def module_suffixes(model: PreTrainedModel) -> set[str]:
    """Every name a list of targets can use for the model's modules: each full name and its dotted tails."""
    keys = [key for key, _ in model.named_modules() if key]  # peft never matches the root module
    return {key.split(".", i)[-1] for key in keys for i in range(key.count(".") + 1)}


def close_names(missing: Sequence[str], known: Iterable[str]) -> str:
    """' Did you mean `x`?' (' Did you mean `x` for `y`, ...?' for several missing names), or ''."""
    known = sorted(set(known))
    pairs = []
    for name in missing:
        # A dotted name (self_attn.q_prj) is compared with names of as many parts, so the hint stays short.
        pool = [k for k in known if k.count(".") == name.count(".")]
        close = difflib.get_close_matches(name, pool, n=1, cutoff=0.6)  # did_you_mean's cutoff
        if close:
            pairs.append((close[0], name))
    if not pairs:
        return ""
    if len(missing) == 1:
        return f" Did you mean `{pairs[0][0]}`?"
    return f" Did you mean {', '.join(f'`{c}` for `{n}`' for c, n in pairs)}?"


def refuse_unmatched(missing: Sequence[str], option: str, known: Iterable[str], listing: str,
                     *, what: str = "module") -> None:
    """Raise `MethodError` naming every one of `missing`, with a did-you-mean and what the model has."""
    if not missing:
        return
    which = ", ".join(f"`{n}`" for n in missing)
    verb = "matches" if len(missing) == 1 else "match"
    raise MethodError(f"`{option}` names {which}, which {verb} no {what} of this model."
                      f"{close_names(missing, known)} {listing}", field=option.split(":")[0])


def norm_module_names(model: PreTrainedModel) -> list[str]:
    """Short names of the model's normalisation layers (what ln_tuning's `target_modules` can name)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and "norm" in type(m).__name__.lower()})


def _check_targets(model: PreTrainedModel, peft_config: Any, ctx: MethodContext) -> None:
    # peft drops a name that matches nothing as long as another one matches: [q_proj, v_prj] would
    # train q_proj alone, so every name of a list must match. Strings (a regex, 'all-linear') are peft's.
    targets = getattr(peft_config, "target_modules", None)
    if not isinstance(targets, (list, set, tuple)) or not targets:
        return
    through_peft = "peft_args" in ctx.options  # `method: peft` takes the names inside `peft_args`
    given = (ctx.options["peft_args"] or {}) if through_peft else ctx.options
    asked = given.get("target_modules")
    in_order = [n for n in asked if n in targets] if isinstance(asked, (list, tuple)) else []  # peft keeps a set
    kind = str(getattr(peft_config.peft_type, "value", peft_config.peft_type))
    if kind == "LN_TUNING":
        listing = f"Its norm modules are: {', '.join(norm_module_names(model))}."
    else:
        all_linear = " (or use 'all-linear')" if kind in ("LORA", "ADALORA") else ""
        listing = f"Its linear modules are: {', '.join(linear_module_names(model))}{all_linear}."
    known = module_suffixes(model)
    missing = [n for n in (in_order or sorted(targets)) if n not in known]
    refuse_unmatched(missing, "peft_args: target_modules" if through_peft else "target_modules", known, listing)


def wrap_with_peft(model: PreTrainedModel, peft_config: Any, ctx: MethodContext) -> PreTrainedModel:
    """`get_peft_model`, after refusing target names that match no module (peft drops them silently as
    long as one other name matches), with k-bit preparation first."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    _check_targets(model, peft_config, ctx)
    if ctx.quantized:
        # Casts norms to fp32 and enables input grads; checkpointing only if the user asked for it,
        # since on a CPU it costs a third more time for memory we rarely lack.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=ctx.config.gradient_checkpointing
        )
    if _has_conv1d(model):
        peft_config.fan_in_fan_out = True  # GPT-2 style Conv1D stores weights transposed
    try:
        with warnings.catch_warnings():
            # peft reads transformers' renamed `is_gradient_checkpointing`; the notice is theirs, not ours.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, peft_config)
    except ValueError as exc:
        if "ParamWrapper" in str(exc) and "lora_dropout" in str(exc):  # all-linear reached fused MoE experts
            raise MethodError(
                "LoRA on this mixture-of-experts model reaches its experts' fused weights, where peft allows no "
                "dropout: set `dropout: 0`, or use `method: moe` to choose experts, router or both.",
                field="dropout") from None
        if "not found in the base model" in str(exc) or "Target modules" in str(exc):
            raise MethodError(
                f"`target_modules` {ctx.options.get('target_modules')!r} matches no module of this model. "
                f"Its linear modules are: {', '.join(linear_module_names(model))} (or use 'all-linear').",
                field="target_modules",
            ) from None
        raise


def _has_conv1d(model: PreTrainedModel) -> bool:
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) for m in model.modules())


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


def disable_lora(model: Any) -> Any:
    init = str(model.peft_config[model.active_adapter].init_lora_weights)
    if init.startswith(_REWRITES_BASE):
        raise MethodError(f"`init: {init}` moved part of the base weights into the adapter, so switching the "
                          "adapter off does not give the base model; load the base again to compare.",
                          field="init")
    return model.disable_adapter()


def register_lora_family(name: str, summary: str, prepare: Any = None, **extra: Any) -> MethodSpec:
    """Register a LoRA variant: LoRA's options, saving (PiSSA conversion), checks and switch-off."""
    fields: dict[str, Any] = {"params": LORA_PARAMS, "adapter": True, "default_lr": 2e-4, "save": save_lora,
                              "validate": validate_lora, "disable": disable_lora, "rewrites_base": rewrites_base,
                              "can_merge": True, **extra}
    return register_method(MethodSpec(name=name, summary=summary, prepare=prepare or _prepare, **fields))


register_lora_family("lora", "Low-rank adapters beside the frozen weights (Hu et al. 2021); rslora and PiSSA init "
                     "as options.")
register_lora_family("qlora", "LoRA on a base quantized to 4-bit NF4 with double quantisation (or 8-bit) by "
                     "bitsandbytes.", default_quantization="4bit", quantization=("4bit", "8bit"))
