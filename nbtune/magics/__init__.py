"""`%load_ext nbtune`: the `%%finetune` cell magic and friends.

The entry points import IPython only when the extension is loaded, so `import nbtune` stays light.
"""

from __future__ import annotations

from typing import Any


def load_ipython_extension(ipython: Any) -> None:
    from nbtune.magics.finetune import Finetune

    ipython.register_magics(Finetune)


def unload_ipython_extension(ipython: Any) -> None:
    from nbtune.magics.finetune import Finetune

    manager = ipython.magics_manager
    for kind, names in Finetune.magics.items():
        for name in names:
            manager.magics[kind].pop(name, None)
    manager.registry.pop("Finetune", None)
