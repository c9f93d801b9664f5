"""The methods registry: every fine-tuning method is one `MethodSpec`, registered by name.

A method supplies what the engine needs from it (how to prepare the model, and optionally its own
optimizer, Trainer callbacks and save routine), so adding a method never touches the engine. The idea
follows peft's `register_peft_method`: registration is validated and refuses bad or duplicate names
with a message that says how to fix them.

    >>> from nbtune.methods import get_method
    >>> get_method("lora").param("r").default
    8
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbtune.errors import MethodError, did_you_mean
from nbtune.params import Param

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


@dataclass(frozen=True)
class MethodSpec:
    """A fine-tuning method: its name, knobs and the hooks the engine calls."""

    name: str
    summary: str
    params: tuple[Param, ...]
    prepare: Prepare
    adapter: bool  # True: base weights stay untouched and the method saves a PEFT adapter
    default_lr: float = 2e-4
    default_quantization: str = "none"
    quantization: tuple[str, ...] = ("none", "4bit", "8bit")  # what the method can train on
    save: Save | None = None  # None: `model.save_pretrained` (adapter or full weights)
    make_optimizer: MakeOptimizer | None = None  # None: the Trainer's AdamW
    make_callbacks: MakeCallbacks | None = None  # called with (ctx, total_steps)
    validate: Validate | None = None  # cross-field checks after each option passed its own
    # For PEFT methods (adapter=True) the defaults are peft's disable_adapter / from_pretrained /
    # merge_and_unload; a method that is no PEFT tuner supplies its own.
    disable: Disable | None = None
    load: Load | None = None  # (fresh base model, saved folder) -> trained model
    merge: Merge | None = None
    can_merge: bool = False
    gradient_checkpointing: bool = True  # False: the engine switches it off (prompt methods)
    # Whether an option makes an adapter write into the base weights (PiSSA's init): then a run cannot
    # share a cached base with others. Methods that train in place (adapter=False) never share.
    rewrites_base: Callable[[dict[str, Any]], bool] | None = None
    # False: a stopped run cannot resume exactly, because peft checkpoints the method's inference form
    # (prefix tuning's projected prompts, AdaLoRA's pruned ranks), not its training state.
    can_resume: bool = True  # False: the engine switches it off (prompt methods)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def option_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def check_options(self, options: Mapping[str, Any], config: RunConfig) -> dict[str, Any]:
        """Defaults filled in, each value checked by its `Param`, then the method's own cross-checks."""
        checked = {p.name: p.check(options.get(p.name, p.default)) for p in self.params}
        if self.validate is not None:
            self.validate(checked, config)
        return checked

    def shares_base(self, options: dict[str, Any]) -> bool:
        """True when training leaves every base tensor untouched, so runs may share one loaded base."""
        return self.adapter and not (self.rewrites_base is not None and self.rewrites_base(options))

    def resumable(self, options: dict[str, Any]) -> bool:
        return self.can_resume

    def disabled(self, model: PreTrainedModel) -> AbstractContextManager[Any]:
        """Context in which `model` computes exactly what the base model computes."""
        if self.disable is not None:
            return self.disable(model)
        if self.adapter:
            return model.disable_adapter()
        raise MethodError(f"method {self.name!r} trained the base weights in place, so there is no base "
                          "to switch back to; load the base model again to compare.")

    def load_trained(self, base_model: PreTrainedModel, path: Path) -> PreTrainedModel:
        """The trained model from a folder `save` wrote, on a freshly loaded base."""
        if self.load is not None:
            return self.load(base_model, path)
        if self.adapter:
            from peft import PeftModel

            return PeftModel.from_pretrained(base_model, str(path))
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(path), dtype=base_model.dtype)

    def merged(self, model: PreTrainedModel) -> PreTrainedModel:
        """`model` with the method folded into plain weights (in place)."""
        if self.merge is not None:
            return self.merge(model)
        self.check_mergeable()
        return model.merge_and_unload()

    def check_mergeable(self) -> None:
        """Raise `MethodError` unless `merged` can fold this method into plain weights."""
        if self.merge is not None:
            return
        if not self.adapter:
            raise MethodError(f"method {self.name!r} trained the weights in place: there is nothing to merge.")
        if not self.can_merge:
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
    from nbtune.config import common_param_names

    if not _NAME.match(spec.name):
        raise MethodError(
            f"method name {spec.name!r} must be lowercase letters, digits and '_', starting with a letter."
        )
    if spec.name in _REGISTRY and not replace:
        raise MethodError(f"method {spec.name!r} is already registered; pass replace=True to override it.")
    if not callable(spec.prepare):
        raise MethodError(f"method {spec.name!r}: `prepare` must be a callable (model, ctx) -> model.")
    names = [p.name for p in spec.params]
    clashes = sorted(set(names) & set(common_param_names()))
    if clashes:
        raise MethodError(
            f"method {spec.name!r}: option(s) {', '.join(clashes)} clash with run settings; rename them."
        )
    if len(set(names)) != len(names):
        raise MethodError(f"method {spec.name!r}: option names repeat: {names}.")
    for p in spec.params:
        p.check(p.default)  # a default that fails its own check is a registration bug
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
