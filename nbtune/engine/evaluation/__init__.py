"""Scoring runs on held-out rows: generated answers, tuned and base (`scoring.py`, read first), the metrics
(`metrics.py`: add a metric there), the per-row table (`predictions.py`), agreement and bootstrap intervals
between runs (`significance.py`), answers while training (`samples.py`), `nbtune.compare`'s data
(`compare.py`), mixed-batch answers of several LoRA runs (`adapters.py`), and greedy generation.

May import: nbtune.config, methods, data, and engine.bases, records, compute. Never the training pipeline.
"""
