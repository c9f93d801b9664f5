"""Imports every built-in method module; each registers itself on import."""

from nbtune.methods import full, lora  # noqa: F401
