"""Objectives: what a run learns from. One `ObjectiveSpec` per objective, registered by name, one module each.

    registry.py       ObjectiveSpec, Curve, MethodRefusal, register_objective / get_objective (read this first)
    sft.py            supervised fine-tuning, the default: the answers, on transformers' Trainer
    dpo.py, orpo.py, simpo.py, kto.py      preference tuning on TRL's trainers, each a `TrlPairs` declaration
    trl_pairs.py      the TRL machinery they share: tokenising pairs, the reference, TRL's trainer with nbtune's
                      checkpoints, data order and callbacks; pair_preview.py: their preview, as TRL builds pairs
    builtin.py        imports the built-in objectives (each registers itself)

What it owns: everything that differs between objectives. The config, the data checks, the pipeline, the
preview, the live panel and `nbtune.compare` ask the spec (`get_objective(config.objective).<declaration>`)
and never compare an objective's name (tests/test_seams.py checks it over the whole package).

May import: nbtune.errors, nbtune.config.params (keys are `Param`s), nbtune.data, and, inside the functions
that need them, the engine's training pieces (engine/training, engine/compute) and TRL. Never nbtune.config's
RunConfig at runtime (only for type checking: the config imports this registry), the api, magics or widgets.
Inside nbtune import the API from `nbtune.objectives.registry`: this package's `__init__` also imports the
built-in objectives, which reach the engine, and the config must not depend on those.

Registration by import is the one exception to "no import cycle": importing this package registers the
built-ins (sft, dpo, orpo, simpo, kto) through builtin.py, so that the registry itself depends on none of them.

Adding an objective (GRPO is next): write `nbtune/objectives/<name>.py` ending in
`register_objective(ObjectiveSpec(...))`: its keys as `Param`s (a key another objective has too, such as
`beta`, is declared again with this objective's default and help), the data formats it takes and a
`check_data` that refuses the others in one line, `tokenize`, `trainer` (build the Trainer from
engine/training/trainer.py's `training_argument_values`, `run_callbacks` and `finish_trainer`, as
`TrlPairs.trainer` does), `preview` and `preview_header`, `scores`, what `train_on_prompt` means for it (or
`refuses` it), its `method_refusals`, the Trainer's log keys mapped to run keys with a `Curve` for each (which
the panel draws, which `nbtune.compare` shows as `columns`), and import it in builtin.py. Nothing else changes.
"""

from nbtune.objectives import builtin  # noqa: F401  (registration by import: see above)
from nbtune.objectives.registry import (
    Curve,
    MethodRefusal,
    ObjectiveSpec,
    all_objectives,
    get_objective,
    register_objective,
    report_columns,
)

__all__ = ["Curve", "MethodRefusal", "ObjectiveSpec", "all_objectives", "get_objective", "register_objective",
           "report_columns"]
