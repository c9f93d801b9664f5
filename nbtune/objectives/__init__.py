"""What a run learns from: one module per objective, each ending in its registration."""
