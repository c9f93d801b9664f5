"""Imports every built-in method module; each registers itself on import."""

from nbtune.methods import bitfit, bottleneck, full, lora, lora_variants, moe, prompts, tuners  # noqa: F401
