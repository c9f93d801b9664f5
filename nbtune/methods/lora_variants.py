"""LoRA variants: DoRA, LoRA+ and AdaLoRA, each on any base LoRA can train on (fp32, 4-bit, 8-bit).

- `dora`: weight-decomposed LoRA (Liu et al. 2024): a learned magnitude per output plus a LoRA direction.
- `loraplus`: LoRA whose B matrices learn `loraplus_lr_ratio` times faster (Hayou et al. 2024), built
  with peft's `create_loraplus_optimizer`.
- `adalora`: SVD-shaped LoRA whose rank budget is reallocated and shrunk while training (Zhang et al.
  2023). peft needs `total_step` and an `update_and_allocate` call after every optimizer step, or
  AdaLoRA silently trains as plain LoRA; nbtune fills the first from the run length and makes the
  second with a Trainer callback, recording the live rank budget as `adalora_rank` in the history.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nbtune.config.params import Param
from nbtune.errors import MethodError
from nbtune.methods.common import wrap_with_peft
from nbtune.methods.lora import LORA_PARAMS, prepare_lora, register_lora_family
from nbtune.methods.registry import MethodContext, MethodSpec, register_method

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, TrainerCallback, TrainingArguments

    from nbtune.config import RunConfig


# ---------------------------------------------------------------- DoRA
def _prepare_dora(model: PreTrainedModel, ctx: MethodContext) -> PreTrainedModel:
    return prepare_lora(model, ctx, use_dora=True)


register_lora_family("dora", "DoRA: LoRA on the direction of each weight plus a trained magnitude vector.",
                     _prepare_dora)


# ---------------------------------------------------------------- LoRA+
def _loraplus_optimizer(model: PreTrainedModel, args: TrainingArguments, ctx: MethodContext) -> torch.optim.Optimizer:
    import torch
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(model, optimizer_cls=torch.optim.AdamW, lr=args.learning_rate,
                                     loraplus_lr_ratio=ctx.options["loraplus_lr_ratio"],
                                     weight_decay=args.weight_decay)


register_lora_family(
    "loraplus", "LoRA+: LoRA with the B matrices on a higher learning rate (lr x loraplus_lr_ratio).",
    prepare_lora, make_optimizer=_loraplus_optimizer,
    params=(*LORA_PARAMS, Param("loraplus_lr_ratio", "float", 16.0, "Learning-rate multiplier of the B "
                                "matrices relative to A.", min=1.0)),
)


# ---------------------------------------------------------------- AdaLoRA
ADALORA_PARAMS = (
    Param("init_r", "int", 12, "Starting rank of every adapted matrix.", min=1, max=4096),
    Param("target_r", "int", 8, "Average rank the budget shrinks to by the end of the schedule.", min=1,
          max=4096),
    Param("alpha", "float", 16.0, "Scale numerator, as in LoRA.", min=0.0, min_exclusive=True),
    Param("dropout", "float", 0.05, "Dropout on the adapter input.", min=0.0, max=1.0, max_exclusive=True),
    Param("target_modules", "names", "all-linear", "Modules that get AdaLoRA: 'all-linear' or names."),
    Param("tinit", "int", 0, "Warm-up steps at full budget before pruning starts.", min=0),
    Param("tfinal", "int", 0, "Final steps at the target budget (fine-tuning the kept ranks).", min=0),
    Param("delta_t", "int", 1, "Steps between budget reallocations.", min=1),
    Param("orth_reg_weight", "float", 0.5, "Weight of the orthogonality penalty on P and Q.", min=0.0),
)


def _prepare_adalora(model: PreTrainedModel, ctx: MethodContext) -> PreTrainedModel:
    from peft import AdaLoraConfig

    o = ctx.options
    if o["tinit"] + o["tfinal"] >= ctx.total_steps:
        raise MethodError(
            f"adalora needs tinit + tfinal ({o['tinit']} + {o['tfinal']}) below the run's {ctx.total_steps} "
            "steps, or the budget never shrinks; lower them or train longer.",
            field="tinit",
        )
    config = AdaLoraConfig(
        init_r=o["init_r"], target_r=o["target_r"], lora_alpha=o["alpha"], lora_dropout=o["dropout"],
        target_modules=o["target_modules"], tinit=o["tinit"], tfinal=o["tfinal"], deltaT=o["delta_t"],
        orth_reg_weight=o["orth_reg_weight"], total_step=ctx.total_steps, task_type="CAUSAL_LM",
    )
    peft_model = wrap_with_peft(model, config, ctx)
    if not any(p.is_meta for p in peft_model.parameters()):  # a weightless model (estimates) has no values
        ctx.step_metrics["adalora_rank"] = adalora_rank(peft_model)
    return peft_model


def adalora_rank(model: Any) -> int:
    """The rank budget in use now: singular values AdaLoRA has not masked to zero, over all layers."""
    import torch

    with torch.no_grad():
        return int(sum((p != 0).sum().item() for n, p in model.named_parameters() if "lora_E" in n))


def _adalora_callbacks(ctx: MethodContext, total_steps: int) -> list[TrainerCallback]:
    from transformers import TrainerCallback

    class AllocateRanks(TrainerCallback):
        # After optimizer.step() and before zero_grad(): update_and_allocate reads the gradients.
        def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            model.base_model.update_and_allocate(state.global_step)
            ctx.step_metrics["adalora_rank"] = adalora_rank(model)

    return [AllocateRanks()]


def _validate_adalora(options: dict[str, Any], config: RunConfig) -> None:
    if options["target_r"] > options["init_r"]:
        raise MethodError(f"adalora `target_r` ({options['target_r']}) must not exceed `init_r` "
                          f"({options['init_r']}): the budget only shrinks.", field="target_r")


register_method(MethodSpec(
    name="adalora",
    summary="AdaLoRA: SVD-form LoRA whose rank budget is pruned to where it matters during training.",
    params=ADALORA_PARAMS,
    prepare=_prepare_adalora,
    default_lr=2e-4,
    make_callbacks=_adalora_callbacks,
    validate=_validate_adalora,
    resumes=False,
    merges=True,
    second_adapter=False,
))
