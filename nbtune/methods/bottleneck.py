"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020), written here because peft has none.

An adapter is down-projection -> nonlinearity -> up-projection, added back to its input (a residual),
with the up-projection starting at zero so the model starts exactly as the base. `houlsby` puts one
after each layer's attention block and one after its FFN; `pfeiffer` only after the FFN. The adapters
hang off the decoder layers through forward hooks, so removing them restores the base bit for bit.
They save as `bottleneck_adapter.safetensors` + `bottleneck_config.json`. (AdapterHub's `adapters`
package does this too, but pins an older transformers.)
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nbtune.config.params import Param
from nbtune.errors import MethodError
from nbtune.methods.common import decoder_layers
from nbtune.methods.registry import MethodContext, MethodSpec, register_method

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CONFIG_FILE, WEIGHTS_FILE = "bottleneck_config.json", "bottleneck_adapter.safetensors"
_ATTENTION = ("self_attn", "attn", "attention", "self_attention")
_FFN = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Bottleneck(nn.Module):
    """h -> h + up(act(down(h))); `up` starts at zero, so a new adapter is the identity."""

    def __init__(self, hidden: int, reduction_factor: int, activation: str) -> None:
        super().__init__()
        width = max(hidden // reduction_factor, 1)
        self.down = nn.Linear(hidden, width)
        self.act = _ACTIVATIONS[activation]()
        self.up = nn.Linear(width, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.enabled = True

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return hidden
        return hidden + self.up(self.act(self.down(hidden.to(self.down.weight.dtype)))).to(hidden.dtype)


def _hook(adapter: Bottleneck) -> Any:
    def apply(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):  # attention returns (output, weights, ...)
            return (adapter(output[0]), *output[1:])
        return adapter(output)

    return apply


def _blocks(model: PreTrainedModel) -> list[nn.Module]:
    name, _ = decoder_layers(model)
    return list(model.get_submodule(name))


def _child(block: nn.Module, names: tuple[str, ...]) -> str:
    found = next((n for n in names if hasattr(block, n)), None)
    if found is None:
        raise MethodError(f"bottleneck adapters need a decoder block with one of {names}; this model's blocks "
                          f"have {[n for n, _ in block.named_children()]}.", field="method")
    return found


def attach(model: PreTrainedModel, config: dict[str, Any]) -> list[Bottleneck]:
    """Add adapters to every decoder block as `config` says; returns them (frozen base, trainable adapters)."""
    hidden = model.config.hidden_size
    adapters = []
    handles = getattr(model, "_nbtune_bottleneck_hooks", [])
    for block in _blocks(model):
        for place in config["placements"]:
            target = _child(block, _ATTENTION if place == "attention" else _FFN)
            adapter = Bottleneck(hidden, config["reduction_factor"], config["activation"])
            adapter.to(device=next(model.parameters()).device)
            block.add_module(f"nbtune_adapter_{place}", adapter)
            handles.append(getattr(block, target).register_forward_hook(_hook(adapter)))
            adapters.append(adapter)
    model._nbtune_bottleneck_hooks = handles
    model._nbtune_bottleneck_config = config
    return adapters


def remove(model: PreTrainedModel) -> PreTrainedModel:
    """Take every bottleneck adapter off `model`; it then computes exactly what the base computes."""
    for handle in getattr(model, "_nbtune_bottleneck_hooks", []):
        handle.remove()
    for block in _blocks(model):
        for place in ("attention", "ffn"):
            if hasattr(block, f"nbtune_adapter_{place}"):
                delattr(block, f"nbtune_adapter_{place}")
    model._nbtune_bottleneck_hooks = []
    return model


def _adapters(model: nn.Module) -> list[Bottleneck]:
    return [m for m in model.modules() if isinstance(m, Bottleneck)]


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    adapters = _adapters(model)
    for adapter in adapters:
        adapter.enabled = False
    try:
        yield
    finally:
        for adapter in adapters:
            adapter.enabled = True


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if ".nbtune_adapter_" in n}


def save(model: PreTrainedModel, path: Path, ctx: MethodContext | None = None) -> None:
    from safetensors.torch import save_file

    save_file(adapter_state(model), str(path / WEIGHTS_FILE))
    (path / CONFIG_FILE).write_text(json.dumps(model._nbtune_bottleneck_config, indent=2) + "\n")


def load(base_model: PreTrainedModel, path: Path) -> PreTrainedModel:
    from safetensors.torch import load_file

    config = json.loads((Path(path) / CONFIG_FILE).read_text())
    attach(base_model, config)
    weights = load_file(str(Path(path) / WEIGHTS_FILE))
    missing = set(adapter_state(base_model)) - set(weights)
    if missing or set(weights) - set(adapter_state(base_model)):
        raise MethodError(f"{path} does not match this model's layers ({len(missing)} adapters missing).",
                          field="model")
    base_model.load_state_dict(weights, strict=False)
    return base_model


def _prepare(placements: tuple[str, ...]) -> Any:
    def prepare(model: PreTrainedModel, ctx: MethodContext) -> PreTrainedModel:
        for param in model.parameters():
            param.requires_grad_(False)
        config = {"placements": list(placements), "reduction_factor": ctx.options["reduction_factor"],
                  "activation": ctx.options["activation"], "method": ctx.config.method}
        for adapter in attach(model, config):
            adapter.requires_grad_(True)
        return model

    return prepare


PARAMS = (
    Param("reduction_factor", "int", 16, "Hidden size / bottleneck width (16: a 576-wide model gets 36).", min=1),
    Param("activation", "str", "relu", "Nonlinearity between the projections.", choices=tuple(_ACTIVATIONS)),
)
for _name, _placements, _summary in (
    ("houlsby", ("attention", "ffn"), "Houlsby adapters: a bottleneck MLP after attention and after the FFN."),
    ("pfeiffer", ("ffn",), "Pfeiffer adapters: one bottleneck MLP after each FFN (half Houlsby's parameters)."),
):
    # Adapters that add computation (a nonlinearity), not a weight delta: they do not merge.
    register_method(MethodSpec(name=_name, summary=_summary, params=PARAMS, prepare=_prepare(_placements),
                               default_lr=1e-3, save=save, load=load, disable=disabled, saves_as="bottleneck"))
