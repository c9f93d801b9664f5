"""Base models: found (offline first), loaded, and shared between runs."""
