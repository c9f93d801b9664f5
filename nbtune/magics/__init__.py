"""`%load_ext nbtune`: the `%%finetune` cell magic and friends.

The entry points import IPython only when the extension is loaded, so `import nbtune` stays light.
"""

from __future__ import annotations

from typing import Any

from nbtune.errors import NbtuneError


def load_ipython_extension(ipython: Any) -> None:
    from nbtune.magics import display
    from nbtune.magics.finetune import Finetune

    ipython.register_magics(Finetune)
    display.register(ipython)  # a Run shown while it trains updates its line when it ends
    _one_line_errors(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from nbtune.magics import display
    from nbtune.magics.finetune import Finetune

    display.unregister(ipython)
    if getattr(ipython, "custom_exceptions", ()) == (NbtuneError,):
        ipython.set_custom_exc((), None)
    manager = ipython.magics_manager
    for kind, names in Finetune.magics.items():
        for name in names:
            manager.magics[kind].pop(name, None)
    manager.registry.pop("Finetune", None)


def _one_line_errors(ipython: Any) -> None:
    """nbtune's user errors (a wrong run name, a bad config) raised by `nbtune.compare(...)`, `run.save()`
    and the like show as one red line in the cell, as they do from `%%finetune`, not as a traceback.
    IPython has one slot for custom exception handlers: a handler someone else set is left in place."""
    from nbtune.magics.finetune import _error_line

    if getattr(ipython, "custom_exceptions", ()) not in ((), (NbtuneError,)):
        return

    def one_line(shell: Any, etype: type, value: BaseException, tb: Any, tb_offset: Any = None) -> list[str]:
        _error_line(value)
        return []

    ipython.set_custom_exc((NbtuneError,), one_line)
