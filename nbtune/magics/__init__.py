"""`%load_ext nbtune`: the `%%finetune` cell magic and friends.

The entry points import IPython only when the extension is loaded, so `import nbtune` stays light.
"""

from __future__ import annotations

from typing import Any


def load_ipython_extension(ipython: Any) -> None:
    from nbtune.magics import display
    from nbtune.magics.finetune import Finetune

    ipython.register_magics(Finetune)
    display.register(ipython)  # a Run shown while it trains updates its line when it ends


def unload_ipython_extension(ipython: Any) -> None:
    from nbtune.magics import display
    from nbtune.magics.finetune import Finetune

    display.unregister(ipython)
    manager = ipython.magics_manager
    for kind, names in Finetune.magics.items():
        for name in names:
            manager.magics[kind].pop(name, None)
    manager.registry.pop("Finetune", None)
