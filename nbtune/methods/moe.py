"""Mixture-of-experts tuning: train the experts only, the router only, or LoRA on the expert weights.

`moe_train: experts` trains every expert's weights in place; `router` trains only the gating layers
(tiny, and the originals are kept so the base can be switched back on); `lora` puts LoRA on the stacked
expert weight tensors through peft's `target_parameters`. A dense model is refused with a clear message.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbtune.config.params import Param
from nbtune.errors import MethodError
from nbtune.methods import partial
from nbtune.methods.common import wrap_with_peft
from nbtune.methods.lora import LORA_PARAMS
from nbtune.methods.registry import MethodContext, MethodSpec, register_method

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from transformers import PreTrainedModel

_ROUTER = re.compile(r"\.(gate|router)\.weight$")


def expert_count(model: PreTrainedModel) -> int:
    config = model.config
    return int(getattr(config, "num_local_experts", 0) or getattr(config, "num_experts", 0) or 0)


def expert_names(model: PreTrainedModel) -> list[str]:
    return [n for n, _ in model.named_parameters() if ".experts." in n]


def router_names(model: PreTrainedModel) -> list[str]:
    count = expert_count(model)
    return [n for n, p in model.named_parameters() if _ROUTER.search(n) and p.shape[0] == count]


def _prepare(model: PreTrainedModel, ctx: MethodContext) -> PreTrainedModel:
    experts = expert_names(model)
    if not expert_count(model) or not experts:
        kind = getattr(model.config, "model_type", type(model).__name__)
        raise MethodError(f"method moe needs a mixture-of-experts model; this {kind} model is dense. "
                          "Use lora or freeze instead.", field="method")
    mode = ctx.options["moe_train"]
    if mode == "router":
        return partial.train_only(model, router_names(model))
    if mode == "experts":
        return partial.train_only(model, experts, keep_originals=False)  # a second copy would be huge
    from peft import LoraConfig

    # LoRA on the stacked expert tensors themselves (e.g. mlp.experts.gate_up_proj), not on modules.
    suffixes = sorted({n.split(".layers.", 1)[-1].split(".", 1)[-1] for n in experts})
    options = ctx.options
    # lora_dropout stays 0: peft's parameter-targeting LoRA cannot apply dropout to a bare tensor.
    config = LoraConfig(r=options["r"], lora_alpha=options["alpha"], lora_dropout=0.0,
                        target_modules=[], target_parameters=suffixes, task_type="CAUSAL_LM")
    return wrap_with_peft(model, config, ctx)


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config")


def _save(model: PreTrainedModel, path: Path, ctx: MethodContext) -> None:
    if _is_peft(model):
        model.save_pretrained(str(path))
    else:
        partial.save(model, path, ctx)


def _load(base_model: PreTrainedModel, path: Path) -> PreTrainedModel:
    if (Path(path) / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model, str(path))
    return partial.load(base_model, path)


def _disable(model: PreTrainedModel) -> AbstractContextManager[Any]:
    return model.disable_adapter() if _is_peft(model) else partial.original_restored(model)


def _merge(model: PreTrainedModel) -> PreTrainedModel:
    if _is_peft(model):
        return model.merge_and_unload()
    raise MethodError("moe with `moe_train: experts` or `router` trained the weights in place: nothing to merge.")


def _in_place(options: dict[str, Any]) -> bool:
    # experts and router train the model's own tensors; lora adds a peft adapter that leaves them as they are
    # (peft's target_parameters applies the update through a parametrization while it computes).
    return options["moe_train"] != "lora"


def _format(options: dict[str, Any]) -> str:
    return "trained_tensors" if _in_place(options) else "peft"


register_method(MethodSpec(
    name="moe",
    summary="Mixture-of-experts tuning: experts only, router only, or LoRA on the expert weights.",
    params=(Param("moe_train", "str", "lora", "What trains: the expert weights, the router (gates), or LoRA "
                  "on the expert weights.", choices=("lora", "experts", "router")),
            *[p for p in LORA_PARAMS if p.name in ("r", "alpha")]),
    prepare=_prepare,
    default_lr=2e-4,
    quantization=("none",),
    save=_save,
    load=_load,
    disable=_disable,
    merge=_merge,
    trains_in_place=_in_place,
    merges=True,  # the LoRA adapter does; the in-place modes add nothing to merge (can_merge says False)
    saves_as=_format,
))
