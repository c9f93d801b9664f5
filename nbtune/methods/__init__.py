"""How a run changes the model: a registry of `MethodSpec`s (`registry.py`, read first), one small module per
method family, each ending in its `register_method(MethodSpec(...))` (`bitfit.py` is the smallest). A spec
declares what its method can do (keep the base, merge, resume, its save format, its options as `Param`s);
the engine asks it and never names a method.

May import: peft, torch, transformers, nbtune.config.params, nbtune.errors. The built-in methods register when
the registry is first asked (`builtin.py`; lazily, as they import peft): the one documented import cycle.
"""

from nbtune.methods.registry import (
    MethodContext,
    MethodSpec,
    all_methods,
    get_method,
    register_method,
)

__all__ = ["MethodContext", "MethodSpec", "all_methods", "get_method", "register_method"]
