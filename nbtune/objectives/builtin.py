"""Imports every built-in objective module; each registers itself on import (sft first: the default)."""

from nbtune.objectives import dpo, kto, orpo, sft, simpo  # noqa: F401
