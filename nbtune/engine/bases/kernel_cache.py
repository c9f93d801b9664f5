"""The kernel's cache of loaded bases, as the modules below the workbench reach it.

The workbench (engine/workbench.py) keeps one pristine base per (model, quantization, dtype) and gives every
run a weight-sharing view of it. Scoring a run against its base and reopening a saved run want those very
bases, but they sit below the workbench (the workbench imports them), so the workbench hands its cache in
here when it is imported, and they ask here. Without a workbench (a script that only calls `nbtune.load`),
bases load afresh.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nbtune.config import RunConfig
    from nbtune.engine.bases.loading import Base

_base_for: Callable[..., Base] | None = None
_view_for: Callable[[RunConfig], Base] | None = None


def use_kernel_bases(base_for: Callable[..., Base], view_for: Callable[[RunConfig], Base]) -> None:
    """`base_for(model, quantization=, dtype=, trust_remote_code=)`: a cached base; `view_for(config)`: a view
    of one for a run of `config` (the workbench's own two)."""
    global _base_for, _view_for
    _base_for, _view_for = base_for, view_for


def cached_base(model: str, *, quantization: str, dtype: str, trust_remote_code: bool) -> Base:
    """The kernel's cached base of `model` (loaded once), or one loaded now where no workbench keeps any."""
    if _base_for is not None:
        return _base_for(model, quantization=quantization, dtype=dtype, trust_remote_code=trust_remote_code)
    from nbtune.engine.bases.loading import load_base

    return load_base(model, quantization=quantization, dtype=dtype, trust_remote_code=trust_remote_code)


def kernel_view_for() -> Callable[[RunConfig], Any] | None:
    """How the kernel gives a run its view of a cached base; None without a workbench."""
    return _view_for
