"""Several LoRA runs on one model: mixed-batch generation and adapter arithmetic.

Runs normally each hold their own view of a shared base. For LoRA-family runs, peft can also hold
many adapters in one model and answer a batch whose rows each use a different adapter
(`adapter_names`), or combine adapters into a new one (`add_weighted_adapter`). `lora_stack` builds
that one model on a fresh weight-sharing view, so the runs themselves are never touched.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

from nbtune.config import RUN_NAME
from nbtune.engine.evaluation.generation import Prompt, _device, _left_padding, as_messages, check_count, eval_mode
from nbtune.engine.records.run import Run
from nbtune.errors import NbtuneError, did_you_mean

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


def is_plain_lora(run: Run) -> bool:
    """True for runs whose adapter is a peft LoRA that mixed batches support (not DoRA or PiSSA)."""
    config = getattr(run.model, "peft_config", {}).get("default")
    return (config is not None and getattr(config, "peft_type", None) is not None
            and config.peft_type.value == "LORA" and not config.use_dora
            and run.method.keeps_base(run.config.options) and not run.context.quantized)


def adapter_name(index: int) -> str:
    # Not the run's name: adapter names become module attributes, so "half" or "a.b" would break peft.
    return f"nbtune_{index}"


def lora_stack(runs: Sequence[Run]) -> Any:
    """One peft model holding every run's LoRA adapter (as `adapter_name(i)`), on a view of their base."""
    from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

    _refuse_other_runs(runs)
    view = _unwrapped_base(runs[0])
    stack = None
    for i, run in enumerate(runs):
        config = copy.deepcopy(run.model.peft_config["default"])
        config.inference_mode = True
        if stack is None:
            stack = PeftModel(view, config, adapter_name=adapter_name(i))
        else:
            stack.add_adapter(adapter_name(i), config)
        try:
            set_peft_model_state_dict(stack, get_peft_model_state_dict(run.model), adapter_name=adapter_name(i))
        except RuntimeError as exc:  # a base of another shape passed in memory under the same name
            if "size mismatch" not in str(exc):
                raise
            raise NbtuneError(f"run {run.name!r} trained on a base of another shape than {runs[0].name!r}; "
                              "stack or combine only runs of one base model.") from None
    stack.eval()
    return stack


def _refuse_other_runs(runs: Sequence[Run]) -> None:
    if not runs or not all(is_plain_lora(r) for r in runs):
        others = ", ".join(f"{r.name!r} ({_why_not_plain(r)})" for r in runs if not is_plain_lora(r))
        raise NbtuneError("stacking or combining adapters needs runs of plain LoRA (lora, qlora-free, loraplus) "
                          "on one base" + (f"; not {others}." if others else "."))


def _why_not_plain(run: Run) -> str:
    if run.model is None:
        return "its weights were reclaimed; load it again with nbtune.load_run"
    config = getattr(run.model, "peft_config", {}).get("default")
    if getattr(config, "use_dora", False):
        return "dora"
    if run.context.quantized:
        return f"on a {run.config.quantization} base"
    if not run.method.keeps_base(run.config.options):
        return f"{run.method.name} with an init that rewrites the base"
    return run.method.name


def _refuse_mixed_bases(runs: Sequence[Run]) -> None:
    # Every adapter is loaded onto the first run's base: one trained on another model would combine
    # without complaint (same shapes) or fail inside torch (other shapes).
    bases = {r.name: f"{r.base_name or r.config.model} in {r.config.dtype}" for r in runs}
    if len(set(bases.values())) > 1:
        listed = ", ".join(f"{name!r} on {base}" for name, base in bases.items())
        raise NbtuneError(f"combine needs runs of one base, and these trained on different ones ({listed}).")


def _unwrapped_base(run: Run) -> Any:
    """The run's base model without its LoRA layers: a view with the adapter modules taken out."""
    from nbtune.engine.bases.loading import shared_view

    view = shared_view(run.model)
    return view.unload()  # peft: replace each LoRA layer by its base layer (weights shared, not merged)


def _adapter_in_fp32(model: Any) -> None:
    """peft makes a combined adapter in the base's dtype (bf16 here); trained adapters, and any adapter
    loaded from a folder, are fp32: keep the combined one fp32 too, so it answers as it will once saved."""
    import torch

    for name, param in model.named_parameters():
        if "lora_" in name and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()


def mixed_generate(stack: Any, tokenizer: Any, prompts: Sequence[Prompt], runs: Sequence[str], *,
                   max_new_tokens: int = 32) -> dict[str, list[str]]:
    """Every prompt answered by the base and by every run of `lora_stack(runs)` in one batch: name -> answers."""
    import torch

    check_count("max_new_tokens", max_new_tokens, 32)
    names = [BASE, *(adapter_name(i) for i in range(len(runs)))]
    labels = ["base", *runs]
    texts = [tokenizer.apply_chat_template(as_messages(p), tokenize=False, add_generation_prompt=True)
             for p in prompts]
    rows = [(name, text) for name in names for text in texts]
    from nbtune.engine.compute.precision import inference_precision

    with eval_mode(stack), _left_padding(tokenizer), torch.no_grad(), inference_precision(stack):
        batch = tokenizer([t for _, t in rows], return_tensors="pt", padding=True, add_special_tokens=False)
        batch = batch.to(_device(stack))
        out = stack.generate(**batch, adapter_names=[n for n, _ in rows], max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answers = [a.strip() for a in tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:],
                                                         skip_special_tokens=True)]
    per = len(texts)
    return {label: answers[i * per:(i + 1) * per] for i, label in enumerate(labels)}


def _check_weights(runs: Sequence[Run], weights: Any) -> list[float]:
    import math
    import numbers

    if not runs:
        raise NbtuneError("combine needs at least one LoRA run, e.g. combine(['a', 'b'], [0.5, 0.5]).")
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__iter__"):
        raise NbtuneError(f"combine `weights` is {weights!r}: give a list with one number per run, "
                          f"e.g. {[round(1 / len(runs), 2)] * len(runs)}.", field="weights")
    weights = list(weights)  # a tuple, a numpy array or a pandas Series too
    if len(weights) != len(runs):
        raise NbtuneError(f"combine needs one weight per run: {len(runs)} runs, {len(weights)} weights.")
    bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w)]
    if bad:
        raise NbtuneError(f"combine `weights` must be finite numbers, one per run; got {bad[0]!r}.",
                          field="weights")
    return [float(w) for w in weights]


def combine(runs: Sequence[Run], weights: Sequence[float], *, how: str = "linear", name: str | None = None,
            density: float = 0.5) -> Run:
    """A new run whose adapter is a weighted combination of LoRA runs' adapters (peft's arithmetic)."""
    weights = _check_weights(runs, weights)
    kinds = {"linear": "linear", "ties": "ties", "svd": "svd"}
    if how not in kinds:
        raise NbtuneError(f"combine `how` is {how!r}; use linear, ties or svd.{did_you_mean(str(how), kinds)}",
                          field="how")
    if how == "ties" and not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise NbtuneError(f"combine `density` is {density!r}: the share of each adapter's largest entries "
                          "that ties keeps, above 0 and at most 1.", field="density")
    name = name or "-".join(r.name.replace("/", "-") for r in runs)[:92] + "-combined"  # a plain run (folder) name
    if not re.fullmatch(RUN_NAME, name):
        raise NbtuneError(f"combine `name` {name!r} is not a run name: letters, digits, '_', '.' or '-', "
                          "starting with a letter or digit.", field="name")
    # Every refusal comes before peft, whose own are bare ValueErrors (or a silently wrong base).
    _refuse_other_runs(runs)
    _refuse_mixed_bases(runs)
    ranks = {r.name: r.model.peft_config["default"].r for r in runs}
    if how == "ties" and len(set(ranks.values())) > 1:
        listed = ", ".join(f"{name!r} has r={r}" for name, r in ranks.items())
        raise NbtuneError(f"combine how='ties' needs LoRA runs of one rank, and {listed}: use how='linear' "
                          "(exact: nbtune concatenates adapters of unequal rank) or how='svd', or train them "
                          "with one `r`.", field="how")
    if how == "linear" and len(set(ranks.values())) > 1:
        how = "cat"  # peft's linear needs equal ranks; concatenation is the exact linear sum otherwise
    stack = lora_stack(runs)
    extra = {"density": density} if how == "ties" else {}
    sources = [adapter_name(i) for i in range(len(runs))]
    # Named "default", as a trained run's adapter is: saving writes it where peft and nbtune load it from.
    stack.add_weighted_adapter(sources, list(weights), "default", combination_type=kinds.get(how, how), **extra)
    stack.set_adapter("default")
    for adapter in sources:
        stack.delete_adapter(adapter)
    _adapter_in_fp32(stack)
    stack.eval()  # peft adds the combined adapter's dropout in training mode
    first = runs[0]
    # Its own name and folder: with the first run's config it would save over that run's adapter.
    config = first.config.with_changes(name=name, output_dir=None)
    combined = Run(config, first.method, first.context, status="combined")
    combined.base_name = first.base_name
    combined.model, combined.tokenizer = stack, first.tokenizer
    combined.metrics = {"combined_from": [r.name for r in runs], "weights": list(weights), "how": how,
                        "trainable_params": first.metrics.get("trainable_params")}
    return combined
