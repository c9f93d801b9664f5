"""One run while it trains: the pipeline (`pipeline.py`, read first: config -> data -> base -> method ->
Trainer -> evaluation -> save), its `TrainingSession` (`session.py`: what exists only while it trains or may
resume; with the pipeline and the record, the only code that touches a run's private state), the Trainer's
arguments and collator (`trainer.py`), history and events (`callbacks.py`, `events.py`), checkpoints, the
divergence guard, the answer-only loss, the data order, several processes, and progress bars.

May import: nbtune.config, methods, objectives, data, and engine.compute, bases, records, evaluation.
"""
