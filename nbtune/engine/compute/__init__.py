"""Where a run computes: the device and precision policy (`device.py`, read first: pure functions the tests
drive on a CPU for every GPU), mixed precision and attention (`precision.py`), memory readings and giving
memory back (`memory.py`), the memory estimate (`estimate.py`) and the pre-flight check (`preflight.py`).

May import: torch, transformers, psutil, nbtune.errors. Nothing else of the engine.
"""
