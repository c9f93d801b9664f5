"""Helpers that more than one method family uses: naming a model's modules, refusing target names that
match nothing, finding the decoder stack, and wrapping a model with a peft tuner.

They live here, not in one method's module, so no method module reaches into another for them (which
made lazy imports and cycles) and a new method finds them in one place.

    >>> from nbtune.methods.common import as_names
    >>> as_names("q_proj"), as_names(["q_proj", "v_proj"]), as_names(None)
    (['q_proj'], ['q_proj', 'v_proj'], [])
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from nbtune.errors import MethodError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from nbtune.methods.registry import MethodContext


def as_names(value: Any) -> list[str]:
    """A `names` option (one name or a list) as a list; empty when unset."""
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def linear_module_names(model: PreTrainedModel) -> list[str]:
    """Short names of the model's linear layers (what `target_modules` can name)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    return sorted(names)


def norm_module_names(model: PreTrainedModel) -> list[str]:
    """Short names of the model's normalisation layers (what ln_tuning's `target_modules` can name)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and "norm" in type(m).__name__.lower()})


def module_suffixes(model: PreTrainedModel) -> set[str]:
    """Every name a list of targets can use for the model's modules: each full name and its dotted tails."""
    keys = [key for key, _ in model.named_modules() if key]  # peft never matches the root module
    return {key.split(".", i)[-1] for key in keys for i in range(key.count(".") + 1)}


def decoder_layers(model: PreTrainedModel) -> tuple[str, int]:
    """(qualified name, count) of the model's stack of decoder blocks, e.g. ('model.layers', 30)."""
    import torch

    expected = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == expected:
            return name, len(module)
    raise MethodError(
        "`trainable_layers` needs the model's stack of decoder layers, and none was found; "
        "use `trainable_modules` to name the parameters to train.",
        field="trainable_layers",
    )


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
