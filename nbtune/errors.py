"""Errors a user can cause.

Every one is an `NbtuneError`: a one-line message that says what is wrong, where (the config field),
and how to fix it. The CLI prints it on one line and the notebook layer shows it without a traceback,
so a typo never costs the runs already in the kernel.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class NbtuneError(Exception):
    """Base class of every error a user can cause and fix."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ConfigError(NbtuneError, ValueError):
    """A config key is unknown, has the wrong type, or is out of range."""


class MethodError(ConfigError):
    """The method is unknown or cannot be applied to this model."""


class DataError(NbtuneError, ValueError):
    """The data cannot be found, read, or understood."""


class ModelError(NbtuneError):
    """The model cannot be found or loaded."""


class DependencyError(NbtuneError, ImportError):
    """An optional package the config asks for is not installed."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean `x`?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean `{close[0]}`?" if close else ""


class RunFailed(NbtuneError):
    """A run crashed for a reason nbtune cannot name (a bug, a library's refusal); the original error is
    its `__cause__`, which `%tb` prints and `%debug` opens in a notebook."""


class RunInterrupted(KeyboardInterrupt):
    """The interrupt (Ctrl-C, the kernel's ■) ended a run. The run is kept, stopped with what it learned,
    in `nbtune.runs` (and as `.run`); being a KeyboardInterrupt, it still ends a loop of runs, a script,
    and in a notebook the cells queued after this one, as any interrupt does."""

    def __init__(self, message: str, run: object = None) -> None:
        super().__init__(message)
        self.run = run


class NbtuneWarning(UserWarning):
    """Something a user should know that does not stop the run (a diverged run, a failed save, a resume
    that changed a setting). In a notebook with the extension loaded it shows as one line."""
