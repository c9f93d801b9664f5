"""Groups of runs on one cached base: one runner (`groups.py`, read first: children on the workbench's base,
one bar, Stop, interrupt and failure handling, one table) and its two strategies, cross-validation
(`crossval.py`) and sweeps (`sweep.py`; the Optuna study in `sweep_study.py`, a trial's config and what a
stored study must match in `sweep_config.py`, what a sweep shows in `sweep_views.py`).

May import: nbtune.config, methods, data, and engine.training, evaluation, records, bases, compute. The
workbench is handed in (a group trains its children through it), never imported.
"""
