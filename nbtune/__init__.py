"""nbtune: fine-tune LLMs from Jupyter (`%%finetune`, the live panel, `nbtune.picker()`), Python and the
command line.

    >>> import nbtune
    >>> run = nbtune.finetune(method="lora", r=8, steps=60)   # doctest: +SKIP
    >>> run.generate("Convert this date to ISO format (YYYY-MM-DD): 4 July 1976")  # doctest: +SKIP
    '1976-07-04'

`import nbtune` is cheap: torch, transformers and peft load when a run starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nbtune.api import combine, compare, history, ledger, load_run, picker, preview, reclaim
from nbtune.catalog import methods
from nbtune.config import DEFAULT_MODEL, RunConfig
from nbtune.errors import ConfigError, DataError, DependencyError, MethodError, ModelError, NbtuneError
from nbtune.methods import MethodSpec, register_method
from nbtune.objectives import ObjectiveSpec, register_objective
from nbtune.widgets.formatters import register_in_running_ipython

__version__ = "0.1.0"

if TYPE_CHECKING:
    from nbtune.engine.records.reopen import load
    from nbtune.engine.records.run import Run
    from nbtune.engine.workbench import finetune

__all__ = [
    "DEFAULT_MODEL", "ConfigError", "DataError", "DependencyError", "MethodError", "MethodSpec", "ModelError",
    "NbtuneError", "ObjectiveSpec", "Run", "RunConfig", "combine", "compare", "cross_validations", "finetune",
    "history", "ledger", "load", "load_run", "methods", "picker", "preview", "reclaim", "register_method",
    "register_objective", "runs", "sweeps",
]

# In a notebook, `import nbtune` alone shows its objects (predictions, sweeps, tables) as HTML views.
register_in_running_ipython()


def load_ipython_extension(ipython: Any) -> None:
    """`%load_ext nbtune`: registers `%%finetune` and friends."""
    from nbtune.magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from nbtune.magics import unload_ipython_extension as unload

    unload(ipython)


def __getattr__(name: str) -> Any:
    # Lazy: the engine imports torch and transformers (seconds), which `import nbtune` should not pay.
    if name == "finetune":
        from nbtune.engine.workbench import finetune

        return finetune
    if name == "runs":
        from nbtune.engine.workbench import WORKBENCH

        return WORKBENCH.runs
    if name == "sweeps":  # by name: the Sweep of a cell that raised (interrupted) is reached here
        from nbtune.engine.workbench import WORKBENCH

        return WORKBENCH.sweeps
    if name == "cross_validations":  # likewise: what a cross-validation interrupted in its cell kept
        from nbtune.engine.workbench import WORKBENCH

        return WORKBENCH.cross_validations
    if name == "load":
        from nbtune.engine.records.reopen import load

        return load
    if name == "Run":
        from nbtune.engine.records.run import Run

        return Run
    raise AttributeError(f"module 'nbtune' has no attribute {name!r}")
