"""Preference tuning: `objective: dpo | orpo | simpo | kto`, on top of any method, through TRL's trainers.

The objective is the one step of the pipeline that differs from supervised fine-tuning (objectives/registry.py):
rows become TRL's conversational pairs (nbtune/data/preference.py) and TRL's trainer learns from them, with
nbtune's callbacks (history, events, guards, Stop), checkpoints and data order mixed in, so a preference run
is watched, stopped, resumed, compared and saved as any run is.

The reference policy costs no second model (`reference_for`):
- a peft method that leaves the base as it is: the base itself, the adapter switched off (peft's
  `disable_adapter`, as TRL does it) for every reference forward;
- a method that trains the base's own weights (full, freeze, bitfit), an adapter of nbtune's own (Houlsby,
  Pfeiffer), or `precompute_ref: true`: the reference log-probs of every pair, computed once before the
  first step, when the model still computes what the base does (TRL's `precompute_ref_log_probs`).
  (AdaLoRA and PiSSA / OLoRA inits are refused with dpo / kto: nbtune/config/objective.py says why.)
ORPO and SimPO have no reference: what they report is the model's own average log-prob per answer token
(`chosen_preferred`, `logp_margin`), named apart from DPO's and KTO's rewards (config_objective.py). Their
forward is TRL's with ORPO's NLL term over the answers unless `train_on_prompt` (`_PairForward`), and their
tokens are counted for tokens/s (`_PairTokens`).

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

from nbtune.config.objective import WITH_REFERENCE, beta_of, loss_type_of, preference_values

if TYPE_CHECKING:
    from nbtune.config import RunConfig
    from nbtune.engine.compute.memory import PeakSampler
    from nbtune.engine.records.run import Run
    from nbtune.engine.training.guards import NonFiniteGuard

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
    """An objective of `nbtune/config/objective.py`'s PREFERENCE: TRL's trainer for it, nbtune's run around it."""

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
        from nbtune.engine.compute import device
        from nbtune.engine.training.trainer import finish_trainer, run_callbacks, training_argument_values

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
        trainer.nbtune_whole_chat_nll = config.train_on_prompt  # ORPO's NLL term (_PairForward)
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
        return settings


class PreferenceMetrics(TrainerCallback):
    """The last evaluation's preference numbers (on the held-out pairs: reward accuracy and margin for dpo,
    chosen_preferred and logp_margin for orpo and simpo, ...; config_objective.py) into `run.metrics`, next
    to eval_loss."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None,
                    **kwargs: Any) -> None:
        values = preference_values(self.run.config.objective, metrics or {}, prefix="eval_")
        self.run.metrics.update({key: round(float(value), 4) for key, value in values.items()})


@cache
def trl_classes(objective: str) -> tuple[type, type]:
    """(nbtune's Trainer for `objective`: TRL's with nbtune's checkpoints and data order, TRL's config)."""
    from nbtune.engine.training.checkpoints import AtomicCheckpoints
    from nbtune.engine.training.sampling import DataOrder

    module, trainer_name, config_name = TRL_TRAINERS[objective]
    with quiet_trl():
        trl = importlib.import_module(module)
    own = (_PairForward, _PairTokens) if objective in ("orpo", "simpo") else ()
    bases = (AtomicCheckpoints, DataOrder, _AsARun, *own, getattr(trl, trainer_name))
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


class _PairForward:
    """ORPO's and SimPO's forward (TRL's ORPO and CPO trainers' `concatenated_forward`), with two changes.

    ORPO's NLL term follows `train_on_prompt`: the chosen answer's tokens (nbtune's default for every
    objective), or the whole chosen chat with `train_on_prompt: true`. TRL's takes it over every non-padding
    token of the chosen chat, system and user text included, with no option to do otherwise; the answer-only
    labels are in TRL's batch already (-100 over the prompt), and the mean over tokens is TRL's.
    Prompt-learning methods (prompt, ptuning) prepend virtual tokens to the logits: only the real tokens'
    positions are kept, as TRL's DPO and KTO trainers do (TRL's ORPO and CPO fail on the shapes).
    The log-probs are averaged per answer token, as ORPO and SimPO (CPO's loss_type simpo, the only CPO loss
    nbtune runs) both take them.
    """

    nbtune_whole_chat_nll = False

    def concatenated_forward(self, model: Any, batch: dict[str, Any]) -> tuple:
        if self.is_encoder_decoder:
            return super().concatenated_forward(model, batch)  # type: ignore[misc]
        import torch
        import torch.nn.functional as F

        padding = self.padding_value if hasattr(self, "padding_value") else self.pad_token_id  # ORPO's name; CPO's
        inputs = self.concatenated_inputs(batch, padding_value=padding, device=self.accelerator.device)
        ids, attention = inputs["concatenated_input_ids"], inputs["concatenated_attention_mask"]
        extra = {"output_router_logits": True} if self.aux_loss_enabled else {}
        outputs = model(ids, attention_mask=attention, use_cache=False, **extra)
        logits = outputs.logits[:, -ids.shape[1]:]
        labels = inputs["concatenated_labels"].to(logits.device)
        chosen = batch["chosen_labels"].shape[0]
        if getattr(self, "cpo_alpha", None) == 0:  # SimPO: CPO's loss without its NLL term
            nll = torch.zeros((), device=logits.device)
        else:
            scored = ids.masked_fill(attention == 0, -100).to(logits.device) if self.nbtune_whole_chat_nll else labels
            nll = F.cross_entropy(logits[:chosen, :-1].flatten(0, 1), scored[:chosen, 1:].flatten(), ignore_index=-100)
        logps = self.get_batch_logps(logits, labels, average_log_prob=True)
        out = (logps[:chosen], logps[chosen:], logits[:chosen, :-1], logits[chosen:, :-1], nll)
        return (*out, outputs.aux_loss) if self.aux_loss_enabled else out


class _PairTokens:
    """Tokens/s for ORPO and SimPO: their batches hold chosen_ and rejected_input_ids and no input_ids, which
    is all the Trainer counts, so this counts the two sides' real (non-padding) tokens, prompt included, as
    the Trainer counts a DPO batch (both sides) and an sft batch; summed over processes as it does."""

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        import torch

        args, state = self.args, self.state
        if args.include_num_input_tokens_seen == "no" or "chosen_attention_mask" not in inputs:
            return
        tokens = inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum()
        tokens = torch.as_tensor(tokens, device=args.device, dtype=torch.int64)
        state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()


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
