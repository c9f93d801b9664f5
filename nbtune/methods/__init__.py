"""Fine-tuning methods: a registry of `MethodSpec`s, one small module per method family."""

from nbtune.methods.registry import (
    MethodContext,
    MethodSpec,
    all_methods,
    get_method,
    register_method,
)

__all__ = ["MethodContext", "MethodSpec", "all_methods", "get_method", "register_method"]
