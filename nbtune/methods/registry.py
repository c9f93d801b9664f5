"""The methods registry: every fine-tuning method is one `MethodSpec`, registered by name.

A method supplies what the engine needs from it (how to prepare the model, and optionally its own
optimizer, Trainer callbacks and save routine) and declares what it can do (keep the base, merge,
resume, what it saves), so adding a method never touches the engine: the engine asks the spec and
never tests a method's name. The idea follows peft's `register_peft_method`: registration is validated
and refuses bad or duplicate names with a message that says how to fix them.

    >>> from nbtune.methods import get_method
    >>> get_method("lora").param("r").default
    8
    >>> moe = get_method("moe")
    >>> moe.can_merge(moe.default_options()), moe.save_format({**moe.default_options(), "moe_train": "router"})
    (True, 'trained_tensors')
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbtune.config.params import Param, run_setting_names
from nbtune.errors import MethodError, did_you_mean

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, TrainerCallback, TrainingArguments

    from nbtune.config import RunConfig


@dataclass
class MethodContext:
    """What a method sees while it prepares a model: the validated options and the run around them."""

    options: dict[str, Any]
    config: RunConfig
    workdir: Path
    quantized: bool = False
    tokenizer: Any = None
    total_steps: int = 0  # optimizer steps the run will take (AdaLoRA schedules its budget on it)
    # Values a method wants in every history record (AdaLoRA's current rank budget, say); the engine
    # copies them into each step's record.
    step_metrics: dict[str, Any] = field(default_factory=dict)


Prepare = Callable[["PreTrainedModel", MethodContext], "PreTrainedModel"]
Save = Callable[["PreTrainedModel", Path, MethodContext], None]
MakeOptimizer = Callable[["PreTrainedModel", "TrainingArguments", MethodContext], "torch.optim.Optimizer"]
MakeCallbacks = Callable[[MethodContext, int], "list[TrainerCallback]"]
Validate = Callable[[dict[str, Any], "RunConfig"], None]
Disable = Callable[["PreTrainedModel"], AbstractContextManager[Any]]
Load = Callable[["PreTrainedModel", Path], "PreTrainedModel"]
Merge = Callable[["PreTrainedModel"], "PreTrainedModel"]
Options = dict[str, Any]
# A capability as a method declares it: one answer, or a function of the validated options (moe trains
# LoRA modules or its own weights depending on `moe_train`).
Flag = bool | Callable[[Options], bool]
Format = str | Callable[[Options], str]

# What `save` writes, by name: `MethodSpec.save_format` answers one of these.
SAVE_FORMATS = {
    "peft": "a peft adapter folder (adapter_config.json + adapter weights), applied onto the base by "
            "PeftModel.from_pretrained",
    "transformers": "the whole model by save_pretrained (config.json + weights), loadable on its own",
    "bottleneck": "nbtune's bottleneck adapters (bottleneck_config.json + bottleneck_adapter.safetensors), "
                  "attached to the base",
    "trained_tensors": "nbtune's file of the base tensors that trained (trained_tensors.json + "
                       "trained_tensors.safetensors), copied into the base",
}


def _ask(declared: Any, options: Options) -> Any:
    return declared(options) if callable(declared) else declared


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config")  # a PeftModel; a plain transformers model has none


@dataclass(frozen=True)
class MethodSpec:
    """A fine-tuning method: its name, knobs, the hooks the engine calls and what it can do.

    Capabilities are asked of the spec with the run's validated options, never inferred from a name:

    - `keeps_base(options)`: training leaves every base tensor untouched, so runs may share one base.
    - `adds_modules(options)`: the trained model is the base plus the method's own modules (a peft
      adapter, bottleneck adapters), so there is a base to switch back to and something to save apart;
      False when the method trained the model's own weights (full, freeze, bitfit, moe experts/router).
    - `can_merge(options)`: the added modules fold into plain weights (`merged` gives a plain model).
    - `can_resume(options)`: a stopped run can resume exactly from its checkpoint.
    - `save_format(options)`: what `save` writes, a key of `SAVE_FORMATS`: "peft" (an adapter folder),
      "transformers" (full weights by save_pretrained), "bottleneck" or "trained_tensors" (nbtune's own
      safetensors file of the adapters, or of the few base tensors that trained).
    """

    name: str
    summary: str
    params: tuple[Param, ...]
    prepare: Prepare
    default_lr: float = 2e-4
    default_quantization: str = "none"
    quantization: tuple[str, ...] = ("none", "4bit", "8bit")  # what the method can train on
    save: Save | None = None  # None: `model.save_pretrained` (adapter or full weights)
    make_optimizer: MakeOptimizer | None = None  # None: the Trainer's AdamW
    make_callbacks: MakeCallbacks | None = None  # called with (ctx, total_steps)
    validate: Validate | None = None  # cross-field checks after each option passed its own
    # None: peft's disable_adapter / PeftModel.from_pretrained (or a whole saved model) / merge_and_unload;
    # a method whose modules are no peft tuner supplies its own.
    disable: Disable | None = None
    load: Load | None = None  # (fresh base model, saved folder) -> trained model
    merge: Merge | None = None
    gradient_checkpointing: bool = True  # False: the engine switches it off (prompt methods)
    # Options that give the same trainable parameters on a weightless (meta) model, for estimates: an
    # initialisation that needs real weights (PiSSA's SVD, a prompt's text embeddings) cannot run there.
    weightless_options: Callable[[Options], Options] | None = None
    # Suggested when a run does not fit in memory: the method trains a few vectors per layer at most.
    few_parameters: bool = False
    # What the method can do, declared; asked through the methods below.
    trains_in_place: Flag = False  # True: it trains the model's own weights and adds no modules
    rewrites_base: Flag = False  # True: its modules start from part of the base weights (PiSSA's init)
    merges: Flag = False  # True: its modules are a weight delta that folds into plain weights
    # False: peft checkpoints the method's inference form (prefix tuning's projected prompts, AdaLoRA's
    # pruned ranks), not its training state, so a stopped run cannot resume exactly.
    resumes: Flag = True
    # False: peft trains one adapter of this kind per model (AdaLoRA), so none can sit beside it; TRL's DPO
    # and KTO add a frozen copy of the adapter beside it.
    second_adapter: Flag = True
    saves_as: Format = "peft"  # a key of SAVE_FORMATS

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def option_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def default_options(self) -> Options:
        """Every option at its default (each default passed its own check at registration)."""
        return {p.name: p.check(p.default) for p in self.params}

    def check_options(self, options: Mapping[str, Any], config: RunConfig) -> Options:
        """Defaults filled in, each value checked by its `Param`, then the method's own cross-checks."""
        checked = {p.name: p.check(options.get(p.name, p.default)) for p in self.params}
        if self.validate is not None:
            self.validate(checked, config)
        return checked

    # ------------------------------------------------------------ capabilities
    def adds_modules(self, options: Options) -> bool:
        """True when the trained model is the base plus the method's own modules (see the class doc)."""
        return not _ask(self.trains_in_place, options)

    def keeps_base(self, options: Options) -> bool:
        """True when training leaves every base tensor untouched, so runs may share one loaded base."""
        return self.adds_modules(options) and not _ask(self.rewrites_base, options)

    def can_merge(self, options: Options) -> bool:
        """True when the added modules fold into plain weights; False too when nothing was added."""
        return self.adds_modules(options) and bool(_ask(self.merges, options))

    def allows_second_adapter(self, options: Options) -> bool:
        """True when another adapter may be added beside the method's (see `second_adapter`)."""
        return bool(_ask(self.second_adapter, options))

    def can_resume(self, options: Options) -> bool:
        """True when a stopped run can resume exactly from its checkpoint."""
        return bool(_ask(self.resumes, options))

    def save_format(self, options: Options) -> str:
        """What `save` writes: a key of `SAVE_FORMATS`."""
        return str(_ask(self.saves_as, options))

    # ------------------------------------------------------------ hooks on a trained model
    def disabled(self, model: PreTrainedModel) -> AbstractContextManager[Any]:
        """Context in which `model` computes exactly what the base model computes."""
        if self.disable is not None:
            return self.disable(model)
        if _is_peft(model):
            return model.disable_adapter()
        raise MethodError(f"method {self.name!r} trained the base weights in place, so there is no base "
                          "to switch back to; load the base model again to compare.")

    def load_trained(self, base_model: PreTrainedModel, path: Path) -> PreTrainedModel:
        """The trained model from a folder `save` wrote, on a freshly loaded base."""
        if self.load is not None:
            return self.load(base_model, path)
        if (Path(path) / "adapter_config.json").is_file():  # the "peft" format
            from peft import PeftModel

            return PeftModel.from_pretrained(base_model, str(path))
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(path), dtype=base_model.dtype)

    def merged(self, model: PreTrainedModel, options: Options | None = None) -> PreTrainedModel:
        """`model` with the method folded into plain weights (in place); `options` as in `check_mergeable`."""
        self.check_mergeable(options)
        if self.merge is not None:
            return self.merge(model)
        return model.merge_and_unload()

    def check_mergeable(self, options: Options | None = None) -> None:
        """Raise `MethodError` unless `merged` can fold this method into plain weights. Pass the run's
        options; without them the method's defaults are asked (the method's `merge` hook still refuses
        from the model what its options cannot merge)."""
        options = self.default_options() if options is None else options
        if not self.adds_modules(options):
            raise MethodError(f"method {self.name!r} trained the weights in place: there is nothing to merge.")
        if not self.can_merge(options):
            raise MethodError(f"method {self.name!r} cannot be merged into the base weights (it adds "
                              "computation, not a weight delta); keep it as an adapter.")

    def describe(self) -> str:
        lines = [f"{self.name}: {self.summary}"]
        lines += [f"    {p.describe()}" for p in self.params]
        return "\n".join(lines)

    def __repr__(self) -> str:  # `nbtune.methods("lora")` in a cell: the method, not its dataclass fields
        return self.describe()

    def _repr_markdown_(self) -> str:
        rows = [f"**{self.name}**: {self.summary}", "", "| option | default | what it does |", "|---|---|---|"]
        rows += [f"| `{p.name}` | `{p.default!r}` | {p.help} |" for p in self.params]
        return "\n".join(rows if self.params else [*rows[:1], "", "No options."])


_REGISTRY: dict[str, MethodSpec] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def register_method(spec: MethodSpec, *, replace: bool = False) -> MethodSpec:
    """Add `spec` to the registry after checking it is well formed; returns it (usable as a decorator target)."""
    if not _NAME.match(spec.name):
        raise MethodError(
            f"method name {spec.name!r} must be lowercase letters, digits and '_', starting with a letter."
        )
    if spec.name in _REGISTRY and not replace:
        raise MethodError(f"method {spec.name!r} is already registered; pass replace=True to override it.")
    if not callable(spec.prepare):
        raise MethodError(f"method {spec.name!r}: `prepare` must be a callable (model, ctx) -> model.")
    names = [p.name for p in spec.params]
    clashes = sorted(set(names) & set(run_setting_names()))
    if clashes:
        raise MethodError(
            f"method {spec.name!r}: option(s) {', '.join(clashes)} clash with run settings; rename them."
        )
    if len(set(names)) != len(names):
        raise MethodError(f"method {spec.name!r}: option names repeat: {names}.")
    for p in spec.params:
        p.check(p.default)  # a default that fails its own check is a registration bug
    if not callable(spec.saves_as) and spec.saves_as not in SAVE_FORMATS:
        raise MethodError(f"method {spec.name!r}: `saves_as` is {spec.saves_as!r}; use one of "
                          f"{', '.join(SAVE_FORMATS)} (or a function of the options that returns one).")
    _REGISTRY[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """The registered method called `name`, or a `MethodError` listing the known ones."""
    _load_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        by_lower = {key.lower(): spec for key, spec in _REGISTRY.items()}
        if isinstance(name, str) and name.lower() in by_lower:  # `LoRA`, `QLoRA`, `IA3` as papers write them
            return by_lower[name.lower()]
        raise MethodError(
            f"`method` is {name!r}, which is not a known method.{did_you_mean(name, _REGISTRY)} "
            f"Known methods: {', '.join(sorted(_REGISTRY))}.",
            field="method",
        ) from None


def all_methods() -> list[MethodSpec]:
    _load_builtin_methods()
    return sorted(_REGISTRY.values(), key=lambda s: s.name)


def _load_builtin_methods() -> None:
    # Imported lazily: the method modules import peft, which costs a second or more.
    import nbtune.methods.builtin  # noqa: F401
