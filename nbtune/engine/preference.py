"""Preference tuning: `objective: dpo | orpo | simpo | kto`, on top of any method, through TRL's trainers.

The objective is the one step of the pipeline that differs from supervised fine-tuning (engine/objectives.py):
rows become TRL's conversational pairs (nbtune/data/preference.py) and TRL's trainer learns from them, with
nbtune's callbacks (history, events, guards, Stop), checkpoints and data order mixed in, so a preference run
is watched, stopped, resumed, compared and saved as any run is.

The reference policy costs no second model (`reference_for`):
- a peft method that leaves the base as it is: the base itself, the adapter switched off (peft's
  `disable_adapter`, as TRL does it) for every reference forward;
- a method that trains the base's own weights (full, freeze, bitfit), an adapter of nbtune's own (Houlsby,
  Pfeiffer), or `precompute_ref: true`: the reference log-probs of every pair, computed once before the
  first step, when the model still computes what the base does (TRL's `precompute_ref_log_probs`).
  (AdaLoRA and PiSSA / OLoRA inits are refused with dpo / kto: nbtune/config_objective.py says why.)
ORPO and SimPO have no reference.

    >>> run = nbtune.finetune(data="demo_pairs", objective="dpo", beta=0.1, steps=40)      # doctest: +SKIP
    >>> run.metrics["reward_accuracy"], run.metrics["reward_margin"]                       # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import importlib
import time
import warnings
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from nbtune.config_objective import PREFERENCE_KEYS, WITH_REFERENCE, beta_of, loss_type_of

if TYPE_CHECKING:
    from nbtune.config import RunConfig
    from nbtune.engine.guards import NonFiniteGuard
    from nbtune.engine.memory import PeakSampler
    from nbtune.engine.result import Run

# objective -> (module, trainer class, config class) in TRL
TRL_TRAINERS = {"dpo": ("trl", "DPOTrainer", "DPOConfig"), "kto": ("trl", "KTOTrainer", "KTOConfig"),
                "orpo": ("trl.experimental.orpo", "ORPOTrainer", "ORPOConfig"),
                "simpo": ("trl.experimental.cpo", "CPOTrainer", "CPOConfig")}


def reference_for(objective: str, method: Any, options: dict[str, Any], precompute: bool, is_peft: bool) -> str:
    """Where the reference log-probs come from: 'none' (orpo, simpo), 'adapter_off' (the base, adapter
    switched off at every step) or 'precomputed' (once, before the first step; see the module docstring)."""
    if objective not in WITH_REFERENCE:
        return "none"
    if precompute or not is_peft or not method.keeps_base(options):
        return "precomputed"
    return "adapter_off"


class PreferenceTuning:
    """An objective of `nbtune/config_objective.py`'s PREFERENCE: TRL's trainer for it, nbtune's run around it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def tokenize(self, train_records: Any, eval_records: Any, fmt: str, tokenizer: Any,
                 config: RunConfig) -> tuple[Any, Any]:
        """Conversational rows with a `length` column (TRL tokenises them with the chat template itself)."""
        from nbtune.data.preference import preference_rows

        train = preference_rows(train_records, fmt, tokenizer=tokenizer, field="data")
        evaluation = (preference_rows(eval_records, fmt, tokenizer=tokenizer, field="eval_data")
                      if eval_records is not None else None)
        if self.name == "kto":
            # TRL's KTO reads rows in order (its KL term pairs neighbours), so the order is drawn here: pairs
            # split into a desirable and an undesirable answer, then shuffled with the run's seed.
            train = _unpaired(train).shuffle(seed=config.seed).flatten_indices()
            evaluation = _unpaired(evaluation) if evaluation is not None else None
        return train, evaluation

    def trainer(self, run: Run, train_set: Any, eval_set: Any, memory: PeakSampler, *, guard: NonFiniteGuard,
                scratch: Path, shared_stop: Any = None) -> Any:
        from nbtune.engine import device
        from nbtune.engine.trainer import finish_trainer, run_callbacks, training_argument_values

        config, model = run.config, run.model
        values = training_argument_values(run, device.current(), scratch=scratch,
                                          periodic_eval=bool(config.eval_steps and eval_set is not None))
        reference = reference_for(self.name, run.method, config.options, config.precompute_ref,
                                  hasattr(model, "peft_config"))
        trainer_class, config_class = trl_classes(self.name)
        args = config_class(**{**values, **self.settings(config, reference)})
        callbacks = [*run_callbacks(run, memory, guard, shared_stop, args.world_size), PreferenceMetrics(run)]
        optimizer = run.method.make_optimizer(model, args, run.context) if run.method.make_optimizer else None
        unpatched_forward(model)  # TRL wraps the forward on every construction: a resume must not wrap it twice
        started = time.perf_counter()
        with quiet_trl():
            trainer = trainer_class(model=model, args=args, train_dataset=_without_length(train_set),
                                    eval_dataset=_without_length(eval_set), processing_class=run.tokenizer,
                                    callbacks=callbacks, optimizers=(optimizer, None))
        if reference == "precomputed" and "reference_seconds" not in run.metrics:  # what no second model cost
            run.metrics["reference_seconds"] = round(time.perf_counter() - started, 2)
        drop_reference_copy(model)
        trainer.nbtune_release = lambda: unpatched_forward(model)  # after the last evaluation (trainer.py)
        return finish_trainer(trainer, run)

    def settings(self, config: RunConfig, reference: str) -> dict[str, Any]:
        """What TRL's config for this objective gets beyond the TrainingArguments every run has."""
        settings: dict[str, Any] = {
            "beta": beta_of(config),
            "max_length": config.max_length,
            "disable_dropout": False,  # the method's own `dropout` option says what dropout there is
            "train_sampling_strategy": "sequential" if self.name == "kto" else "random",
        }
        if self.name in WITH_REFERENCE:
            settings["loss_type"] = loss_type_of(config)
            settings["precompute_ref_log_probs"] = reference == "precomputed"
            settings["remove_unused_columns"] = True  # only TRL's tokenised columns reach its collator
        if self.name == "simpo":  # SimPO is CPO's simpo loss without its NLL term (the SimPO paper's loss)
            settings.update(loss_type="simpo", cpo_alpha=0.0)
        if self.name in ("orpo", "simpo"):
            # Their batches hold chosen_/rejected_input_ids, no input_ids for the Trainer to count.
            settings["include_num_input_tokens_seen"] = "no"
        return settings


class PreferenceMetrics(TrainerCallback):
    """The last evaluation's preference numbers (reward accuracy and margin on the held-out pairs, ...)
    into `run.metrics`, next to eval_loss."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None,
                    **kwargs: Any) -> None:
        for theirs, ours in PREFERENCE_KEYS.items():
            if f"eval_{theirs}" in (metrics or {}):
                self.run.metrics[ours] = round(float(metrics[f"eval_{theirs}"]), 4)


@cache
def trl_classes(objective: str) -> tuple[type, type]:
    """(nbtune's Trainer for `objective`: TRL's with nbtune's checkpoints and data order, TRL's config)."""
    from nbtune.engine.checkpoints import AtomicCheckpoints
    from nbtune.engine.sampling import DataOrder

    module, trainer_name, config_name = TRL_TRAINERS[objective]
    with quiet_trl():
        trl = importlib.import_module(module)
    bases = (AtomicCheckpoints, DataOrder, _AsARun, getattr(trl, trainer_name))
    return type(f"Run{trainer_name}", bases, {}), getattr(trl, config_name)


class _AsARun:
    """What nbtune changes in TRL's preference trainers."""

    def _send_telemetry(self) -> None:
        """Nothing: nbtune works offline-first and sends nothing on the user's behalf (TRL pings the hub)."""

    def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
        """A set that has its reference log-probs already (a resumed run's, computed before its first step)
        keeps them: computing them again now would take the trained model as the reference."""
        if any(c.startswith("ref_") for c in dataset.column_names):
            return dataset
        return super()._precompute_ref_logps(dataset, name, batch_size)  # type: ignore[misc]


def drop_reference_copy(model: Any) -> None:
    """TRL copies a peft model's adapter into a frozen 'ref' adapter to be the reference. nbtune's reference
    is the base with the adapter off, or log-probs computed before the first step (which TRL has done by
    now, in its constructor), so the copy goes again: it would cost memory and be saved with the run."""
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
        model.set_adapter("default")


def unpatched_forward(model: Any) -> None:
    """Undo TRL's fused-head forward (an instance attribute on the base model), so that the run's model
    is the class's own again (after training, and before a resume's Trainer patches it anew)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.__dict__.pop("forward", None)


@contextlib.contextmanager
def quiet_trl() -> Iterator[None]:
    """TRL's warnings that say nothing to an nbtune user: the experimental namespace (ORPO and CPO live
    there), and the notes on settings nbtune chose deliberately; and no progress bar per `datasets.map` of
    its tokenising (nbtune's panel shows the run)."""
    from nbtune.data.loading import quiet_datasets

    with warnings.catch_warnings(), quiet_datasets():
        warnings.filterwarnings("ignore", message=".*trl.experimental.*")
        warnings.filterwarnings("ignore", message=".*remove_unused_columns.*")
        yield


def _unpaired(dataset: Any) -> Any:
    """Pairs as KTO's labelled single answers: chosen desirable, rejected not (rows already single pass)."""
    import datasets

    if "chosen" not in dataset.column_names:
        return dataset
    rows = []
    for row in dataset:
        rows.append({"prompt": row["prompt"], "completion": row["chosen"], "label": True, "length": row["length"]})
        rows.append({"prompt": row["prompt"], "completion": row["rejected"], "label": False, "length": row["length"]})
    return datasets.Dataset.from_list(rows)


def _without_length(dataset: Any) -> Any:
    if dataset is None or "length" not in dataset.column_names:
        return dataset
    return dataset.remove_columns("length")


__all__ = ["PreferenceMetrics", "PreferenceTuning", "drop_reference_copy", "reference_for",
           "trl_classes", "unpatched_forward"]
