"""Settings: `RunConfig` (every key typed, defaulted and documented), read from YAML, dicts and cells, and the
checks that make every mistake one line naming the key and the fix.

    run_config.py     RunConfig and parsing (read this first)
    params.py         Param: one key's type, default, limits and help (method options and objective keys too)
    objective_keys.py which keys are the objective's, and the one-line refusals its spec declares
    evaluation.py     `metric:` and the evaluation keys      trackers.py   `report_to:`
    sweep_space.py    a `sweep:` block: the search space, what it optimises, sampler, pruner
    text.py           a config written back as YAML          yaml_source.py  YAML in, safely
    foreign_names.py  other tools' names for nbtune's keys (learning_rate -> lr)

May import: nbtune.errors, nbtune.safety, nbtune.methods (options are the method's), nbtune.objectives.registry
(keys are the objective's; the objectives import RunConfig only to type-check). Never the engine, magics or
widgets.
"""

from nbtune.config.run_config import (
    DEFAULT_MODEL,
    RUN_NAME,
    RUN_PATH,
    RunConfig,
    common_param_names,
    common_params,
    load_yaml,
    overlay,
    without_other_methods_options,
)

__all__ = ["DEFAULT_MODEL", "RUN_NAME", "RUN_PATH", "RunConfig", "common_param_names", "common_params",
           "load_yaml", "overlay", "without_other_methods_options"]
