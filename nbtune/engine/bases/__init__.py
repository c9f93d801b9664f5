"""Base models: found (a folder, the caches, the hub, the default model's GGUF wheel), loaded for training,
and shared between runs as weight-sharing views (`loading.py`, read first); `kernel_cache.py` is how the layers
below the workbench (scoring, reopening) reach the kernel's cached bases.

May import: nbtune.config (the default model), nbtune.safety, engine.compute, engine.training.quiet.
"""
