"""`%load_ext nbtune`: the `%%finetune` cell magic and friends.

The entry points import IPython only when the extension is loaded, so `import nbtune` stays light.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from nbtune.errors import NbtuneError, NbtuneWarning, RunFailed, RunInterrupted


def load_ipython_extension(ipython: Any) -> None:
    from nbtune.magics import display
    from nbtune.magics.finetune import Finetune
    from nbtune.widgets.formatters import register_views

    ipython.register_magics(Finetune)
    display.register(ipython)  # a Run shown while it trains updates its line when it ends
    register_views(ipython)  # the engine's objects as their HTML views (nbtune/widgets/formatters.py)
    _one_line_errors(ipython)
    _one_line_warnings()


def unload_ipython_extension(ipython: Any) -> None:
    from nbtune.magics import display
    from nbtune.magics.finetune import Finetune
    from nbtune.widgets.formatters import forget_views

    display.unregister(ipython)
    forget_views(ipython)
    if getattr(ipython, "custom_exceptions", ()) == ONE_LINE:
        ipython.set_custom_exc((), None)
    if getattr(warnings.showwarning, "_nbtune_wraps", None) is not None:
        warnings.showwarning = warnings.showwarning._nbtune_wraps
    manager = ipython.magics_manager
    for kind, names in Finetune.magics.items():
        for name in names:
            manager.magics[kind].pop(name, None)
    manager.registry.pop("Finetune", None)


ONE_LINE = (NbtuneError, RunInterrupted)
def _one_line_errors(ipython: Any) -> None:
    """nbtune's errors (a bad config in `%%finetune`, a wrong run name in `nbtune.compare(...)`, a run that
    crashed, an interrupted run) show as one red line, not a traceback; the cell still ends in error, so a
    "Run All" stops there. IPython has one slot for custom exception handlers: a handler someone else set
    is left in place (nbtune's errors then show as ordinary tracebacks)."""
    if getattr(ipython, "custom_exceptions", ()) not in ((), ONE_LINE, (NbtuneError,)):
        return

    def one_line(shell: Any, etype: type, value: BaseException, tb: Any, tb_offset: Any = None) -> list[str]:
        print(f"\x1b[31mnbtune: {value}\x1b[0m", file=sys.stderr)
        _remember_for_tb_and_debug(shell, value)
        return []

    ipython.set_custom_exc(ONE_LINE, one_line)


def _remember_for_tb_and_debug(shell: Any, value: BaseException) -> None:
    """What `%tb` prints and `%debug` opens: for a crash nbtune wrapped (RunFailed), the crash itself.
    IPython records the last exception only for the tracebacks it prints, not for a custom handler's."""
    cause = value.__cause__ if isinstance(value, RunFailed) and value.__cause__ is not None else value
    sys.last_type, sys.last_value, sys.last_traceback = type(cause), cause, cause.__traceback__
    if sys.version_info >= (3, 12):
        sys.last_exc = cause
    traceback_printer = getattr(shell, "InteractiveTB", None)
    if traceback_printer is not None:
        traceback_printer.tb = None  # else %debug opens the traceback printed before this one


def _one_line_warnings() -> None:
    """nbtune's warnings (a diverged run, a failed save) as one line in the cell, without the source
    location inside nbtune that Python's warning format adds; other warnings as they were."""
    shown = warnings.showwarning
    if getattr(shown, "_nbtune_wraps", None) is not None:
        return

    def showwarning(message: Any, category: type, filename: str, lineno: int, file: Any = None,
                    line: Any = None) -> None:
        if issubclass(category, NbtuneWarning):
            print(f"\x1b[33mnbtune: warning: {message}\x1b[0m", file=file or sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    showwarning._nbtune_wraps = shown  # type: ignore[attr-defined]
    warnings.showwarning = showwarning
