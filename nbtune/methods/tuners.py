"""(IA)3, LN tuning, and any other peft tuner by name.

- `ia3`: learned scaling vectors on keys, values and the FFN (Liu et al. 2022); targets default to
  peft's per-architecture choice (k_proj, v_proj, down_proj on Llama; c_attn, mlp.c_proj on GPT-2).
- `ln_tuning`: train only the layer norms (peft's LNTuning).
- `peft`: pass-through to any peft tuner: `peft_type: vera` (or loha, lokr, oft, boft, ...) with its
  keyword arguments in `peft_args`, for the methods nbtune has no shortcut for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nbtune.config.params import Param
from nbtune.errors import MethodError, did_you_mean
from nbtune.methods.common import (
    as_names,
    linear_module_names,
    module_suffixes,
    refuse_unmatched,
    wrap_with_peft,
)
from nbtune.methods.registry import MethodContext, MethodSpec, register_method

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from nbtune.config import RunConfig


def _as_list(value: Any) -> list[str] | None:
    """Module names as a list, or None when none were given (peft then uses its per-model default)."""
    names = as_names(value)
    return names or None


# ---------------------------------------------------------------- (IA)3
def _prepare_ia3(model: PreTrainedModel, ctx: MethodContext) -> PreTrainedModel:
    from peft import IA3Config
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
    )
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS,
    )

    kind = model.config.model_type
    targets = _as_list(ctx.options["target_modules"]) or TARGETS.get(kind)
    feedforward = _as_list(ctx.options["feedforward_modules"])
    if feedforward is None and targets is not None:
        feedforward = [m for m in FEEDFORWARD.get(kind, []) if m in targets]
    if targets is None:
        raise MethodError(
            f"ia3 has no default targets for model type {kind!r}; set `target_modules` (keys, values and an FFN "
            f"output) from: {', '.join(linear_module_names(model))}.",
            field="target_modules",
        )
    _check_ia3_names(model, targets, feedforward or [], kind)
    config = IA3Config(target_modules=targets, feedforward_modules=feedforward or [], task_type="CAUSAL_LM")
    return wrap_with_peft(model, config, ctx)


def _check_ia3_names(model: PreTrainedModel, targets: list[str], feedforward: list[str], kind: str) -> None:
    # Before IA3Config, which refuses a feedforward name outside the targets with a bare ValueError, and
    # before peft, which drops a target name that matches nothing as long as another one matches.
    known = module_suffixes(model)
    listing = f"Its linear modules are: {', '.join(linear_module_names(model))}."
    for option, names in (("target_modules", targets), ("feedforward_modules", feedforward)):
        refuse_unmatched([n for n in names if n not in known], option, known, listing)
    stray = [m for m in feedforward if m not in targets]
    if stray:  # only with default targets: _validate_ia3 caught it for targets the user named
        raise MethodError(f"ia3 `feedforward_modules` {stray} must also be targets, and {kind}'s default "
                          f"`target_modules` are {targets}; add them there.", field="feedforward_modules")


def _validate_ia3(options: dict[str, Any], config: RunConfig) -> None:
    targets, feedforward = _as_list(options["target_modules"]), _as_list(options["feedforward_modules"])
    if targets and feedforward:
        stray = [m for m in feedforward if m not in targets]
        if stray:
            raise MethodError(f"ia3 `feedforward_modules` {stray} must also be in `target_modules` {targets}.",
                              field="feedforward_modules")


register_method(MethodSpec(
    name="ia3",
    summary="(IA)3: learned scaling vectors on keys, values and FFN activations; the fewest parameters.",
    params=(
        Param("target_modules", "names", [], "Modules to scale; empty: peft's default for the architecture."),
        Param("feedforward_modules", "names", [], "Which targets are FFN layers (scaled on their input); "
              "empty: the architecture's default."),
    ),
    prepare=_prepare_ia3,
    default_lr=3e-3,
    validate=_validate_ia3,
    merges=True,
    few_parameters=True,
))


# ---------------------------------------------------------------- LN tuning
def _prepare_ln(model: PreTrainedModel, ctx: MethodContext) -> PreTrainedModel:
    from peft import LNTuningConfig

    config = LNTuningConfig(target_modules=_as_list(ctx.options["target_modules"]), task_type="CAUSAL_LM")
    return wrap_with_peft(model, config, ctx)


register_method(MethodSpec(
    name="ln_tuning",
    summary="LN tuning: only the layer-norm weights train (a copy of them, so the base stays intact).",
    params=(Param("target_modules", "names", [], "Norm modules to tune; empty: every norm of the model."),),
    prepare=_prepare_ln,
    default_lr=1e-3,
    merges=True,
    few_parameters=True,
))


# ---------------------------------------------------------------- any peft tuner
def _peft_config(options: dict[str, Any]) -> Any:
    from peft import PeftType
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    names = sorted(t.value.lower() for t in PEFT_TYPE_TO_CONFIG_MAPPING)
    kind = options["peft_type"].lower()
    if kind not in names:
        raise MethodError(f"`peft_type` {options['peft_type']!r} is not a peft tuner.{did_you_mean(kind, names)} "
                          f"Known: {', '.join(names)}.", field="peft_type")
    config_class = PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(kind.upper())]
    args = dict(options["peft_args"] or {})
    try:
        return config_class(task_type="CAUSAL_LM", **args)
    except TypeError as exc:
        raise MethodError(f"`peft_args` for {kind}: {exc}. See peft's {config_class.__name__} for its fields.",
                          field="peft_args") from None
    except ValueError as exc:
        raise MethodError(f"`peft_args` for {kind}: {exc}", field="peft_args") from None


def _prepare_peft(model: PreTrainedModel, ctx: MethodContext) -> PreTrainedModel:
    return wrap_with_peft(model, _peft_config(ctx.options), ctx)


def _validate_peft(options: dict[str, Any], config: RunConfig) -> None:
    if options["peft_args"] is not None and not isinstance(options["peft_args"], dict):
        raise MethodError("`peft_args` must be a mapping of the tuner's keyword arguments, e.g. {r: 64}.",
                          field="peft_args")
    _peft_config(options)  # fail before any weight is loaded


def _peft_rewrites_base(options: dict[str, Any]) -> bool:
    # Initialisations such as PiSSA, OLoRA or CorDA move part of the base weights into the adapter.
    inits = ("pissa", "olora", "corda", "loftq")
    return any(isinstance(v, str) and v.lower().startswith(inits) for v in (options["peft_args"] or {}).values())


def _peft_merges(options: dict[str, Any]) -> bool:
    # Prompt-learning tuners (prefix_tuning, prompt_tuning, p_tuning, ...) add virtual tokens, no weight delta.
    return not _peft_config(options).is_prompt_learning


register_method(MethodSpec(
    name="peft",
    summary="Any peft tuner by name (vera, loha, lokr, oft, boft, ...) with its own keyword arguments.",
    params=(
        Param("peft_type", "str", "vera", "The peft tuner, as peft names it (lowercase)."),
        Param("peft_args", "any", None, "Keyword arguments of the tuner's peft config, e.g. {r: 64, "
              "target_modules: [q_proj, v_proj]}.", nullable=True),
    ),
    prepare=_prepare_peft,
    default_lr=1e-3,
    validate=_validate_peft,
    rewrites_base=_peft_rewrites_base,
    merges=_peft_merges,
))
