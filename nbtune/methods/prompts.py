"""Prompt-learning methods: trained virtual tokens in front of every sequence, the base untouched.

- `prefix`: prefix tuning (Li & Liang 2021): trained key/value prefixes in every layer, by default
  produced through an MLP (`prefix_projection`), as in the paper.
- `ptuning_v2`: P-tuning v2 (Liu et al. 2022): the same deep prompts, trained directly by default;
  `reparameterize: true` adds the MLP.
- `prompt`: prompt tuning (Lester et al. 2021): trained input embeddings only; `init: text` starts
  them from the embeddings of `init_text`.
- `ptuning`: P-tuning v1 (Liu et al. 2021): input prompts produced by a small MLP or LSTM encoder.

All are peft tuners. None merges into weights, and gradient checkpointing is switched off for them
(peft's prompt methods and re-entrant checkpointing do not mix).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nbtune.config.params import Param
from nbtune.errors import MethodError
from nbtune.methods.common import wrap_with_peft
from nbtune.methods.registry import MethodContext, MethodSpec, register_method

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from nbtune.config import RunConfig

TOKENS = Param("num_virtual_tokens", "int", 20, "How many virtual tokens are trained.", min=1, max=4096)
ENCODER_SIZE = Param("encoder_hidden_size", "int", 128, "Hidden size of the reparameterisation network.", min=1)


def _prefix(model: PreTrainedModel, ctx: MethodContext, projection: bool) -> PreTrainedModel:
    from peft import PrefixTuningConfig

    config = PrefixTuningConfig(num_virtual_tokens=ctx.options["num_virtual_tokens"], prefix_projection=projection,
                                encoder_hidden_size=ctx.options["encoder_hidden_size"], task_type="CAUSAL_LM")
    return wrap_with_peft(model, config, ctx)


def _prepare_prefix(model: PreTrainedModel, ctx: MethodContext) -> PreTrainedModel:
    return _prefix(model, ctx, ctx.options["prefix_projection"])


def _prepare_ptuning_v2(model: PreTrainedModel, ctx: MethodContext) -> PreTrainedModel:
    return _prefix(model, ctx, ctx.options["reparameterize"])


def _prepare_prompt(model: PreTrainedModel, ctx: MethodContext) -> PreTrainedModel:
    from peft import PromptTuningConfig

    n = ctx.options["num_virtual_tokens"]
    peft_model = wrap_with_peft(model, PromptTuningConfig(num_virtual_tokens=n, task_type="CAUSAL_LM"), ctx)
    if ctx.options["init"] == "text":
        _init_from_text(peft_model, ctx.tokenizer, ctx.options["init_text"], n)
    return peft_model


def _init_from_text(peft_model: Any, tokenizer: Any, text: str, n: int) -> None:
    # peft's own text init re-loads the tokenizer by name from disk; the run already has it in memory.
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = (ids * (n // len(ids) + 1))[:n]  # repeat the text to fill every virtual token
    words = peft_model.get_input_embeddings()
    table = peft_model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        table.copy_(words(torch.tensor(ids, device=table.device)).to(table.dtype))


def _prepare_ptuning(model: PreTrainedModel, ctx: MethodContext) -> PreTrainedModel:
    from peft import PromptEncoderConfig

    config = PromptEncoderConfig(num_virtual_tokens=ctx.options["num_virtual_tokens"],
                                 encoder_hidden_size=ctx.options["encoder_hidden_size"],
                                 encoder_reparameterization_type=ctx.options["encoder"].upper(),
                                 task_type="CAUSAL_LM")
    return wrap_with_peft(model, config, ctx)


def _validate_prompt(options: dict[str, Any], config: RunConfig) -> None:
    if options["init"] == "text" and not options["init_text"].strip():
        raise MethodError("prompt tuning with `init: text` needs `init_text`, e.g. 'Convert the date:'.",
                          field="init_text")
    if options["init"] != "text" and options["init_text"].strip():  # it would be ignored without a word
        raise MethodError(f"`init_text` is set but `init` is {options['init']!r}; add `init: text` to start the "
                          "prompt from it (or drop init_text).", field="init")


def _random_init(options: dict[str, Any]) -> dict[str, Any]:
    # The same trained embeddings either way; text needs the tokenizer and real embedding weights.
    return {**options, "init": "random", "init_text": ""}


def _register(name: str, summary: str, params: tuple[Param, ...], prepare: Any, lr: float, **extra: Any) -> None:
    # Virtual tokens are extra inputs, not a weight delta: nothing merges (`merges` stays False).
    register_method(MethodSpec(name=name, summary=summary, params=params, prepare=prepare, default_lr=lr,
                               gradient_checkpointing=False, **extra))


_register("prefix", "Prefix tuning: trained key/value prefixes in every layer (MLP-reparameterised).",
          (TOKENS, Param("prefix_projection", "bool", True, "Produce the prefixes through an MLP while "
                         "training (more stable, as in the paper)."), ENCODER_SIZE), _prepare_prefix, lr=1e-3,
          resumes=False)
_register("ptuning_v2", "P-tuning v2: deep prompts in every layer, trained directly by default.",
          (TOKENS, Param("reparameterize", "bool", False, "Produce the prompts through an MLP while training."),
           ENCODER_SIZE), _prepare_ptuning_v2, lr=5e-3, resumes=False)
_register("prompt", "Prompt tuning: trained embeddings of virtual tokens at the input only.",
          (TOKENS, Param("init", "str", "random", "Start from random vectors or from `init_text`'s embeddings.",
                         choices=("random", "text")),
           Param("init_text", "str", "", "Text whose token embeddings start the prompt (init: text).")),
          _prepare_prompt, lr=3e-2, validate=_validate_prompt, weightless_options=_random_init,
          few_parameters=True)
_register("ptuning", "P-tuning (v1): input prompts produced by a small MLP or LSTM prompt encoder.",
          (TOKENS, ENCODER_SIZE, Param("encoder", "str", "mlp", "Prompt encoder network.",
                                       choices=("mlp", "lstm"))), _prepare_ptuning, lr=1e-3, resumes=False)
