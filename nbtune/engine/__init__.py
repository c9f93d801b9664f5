"""The headless engine: model loading, the Trainer-driven run, events, memory, saving.

Nothing here imports IPython, ipywidgets or traitlets; the notebook layer observes the engine.
"""

from nbtune.engine.training.quiet import install_log_filters

install_log_filters()
