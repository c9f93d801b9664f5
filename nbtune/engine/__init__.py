"""The headless engine: everything that trains, scores, records and exports runs, with no notebook code.

    workbench.py   the kernel's workbench (read first): cached bases, runs and groups by name, and `finetune`,
                   the one place a config is decided to be one run, a cross-validation or a sweep
    training/      one run while it trains: the pipeline, its session, the Trainer's wiring and callbacks
    compute/       where it computes: device and precision policy, memory, the estimate, the pre-flight check
    bases/         base models found (offline first), loaded, shared between runs as views
    records/       the record a run leaves (`Run`) and its folder (run.json, one owner), history, reopening
    evaluation/    scoring runs on held-out rows (metrics, predictions, significance) and comparing them
    experiments/   groups of runs on one cached base: cross-validation and sweeps, one runner
    export/        a model out: merged safetensors, GGUF, Ollama's Modelfile, launch files

May import: nbtune.config, nbtune.methods, nbtune.objectives, nbtune.data, nbtune.errors, nbtune.safety, and the
libraries (torch, transformers, peft, TRL, optuna). Never IPython, ipywidgets or traitlets (tests/test_layers.py),
and never nbtune.widgets, nbtune.magics or nbtune.api, lazily or not (tests/test_seams.py): the notebook layer
observes the engine (training/events.py) and shows its objects through views registered by name
(nbtune/widgets/formatters.py). Inside, the sub-packages import down: experiments -> training, evaluation,
records, bases, compute; training -> evaluation, records, bases, compute; records and evaluation -> bases, compute.
"""

from nbtune.engine.training.quiet import install_log_filters

install_log_filters()
