"""The TRL machinery the preference objectives share (dpo.py, orpo.py, simpo.py, kto.py each declare a
`TrlPairs` and register it): rows become TRL's conversational pairs (nbtune/data/preference.py) and TRL's
trainer learns from them, with nbtune's callbacks (history, events, guards, Stop), checkpoints and data order
mixed in, so a preference run is watched, stopped, resumed, compared and saved as any run is.

The reference policy costs no second model (`reference_for`):
- a peft method that leaves the base as it is: the base itself, the adapter switched off (peft's
  `disable_adapter`, as TRL does it) for every reference forward;
- a method that trains the base's own weights (full, freeze, bitfit), an adapter of nbtune's own (Houlsby,
  Pfeiffer), or `precompute_ref: true`: the reference log-probs of every pair, computed once before the
  first step, when the model still computes what the base does (TRL's `precompute_ref_log_probs`).
  (Methods whose adapter cannot have TRL's frozen copy beside it are refused: `REFERENCE_COPY` says why.)
Without a reference (ORPO, SimPO) what is reported is the model's own average log-prob per answer token
(`chosen_preferred`, `logp_margin`), named apart from DPO's and KTO's rewards (`RELATIVE`, `ABSOLUTE`). Their
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
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbtune.config.params import Param
from nbtune.errors import ConfigError, DataError, did_you_mean
from nbtune.objectives.registry import Curve, MethodRefusal

if TYPE_CHECKING:
    from nbtune.config import RunConfig
    from nbtune.data.preview import BatchPreview
    from nbtune.engine.compute.memory import PeakSampler
    from nbtune.engine.records.run import Run
    from nbtune.engine.training.guards import NonFiniteGuard
    from nbtune.methods.registry import MethodSpec
    from nbtune.objectives.registry import Validate

KIND = "preference-tuning"
COLUMNS = {"preference": "prompt, chosen, rejected", "unpaired": "prompt, completion, label"}

# TRL's logged names -> the run's. TRL calls two different things "rewards". DPO's and KTO's are implicit
# rewards, beta x the answer's log-prob ratio to the reference: a reward accuracy of 1.0 says the tuned model
# moved every chosen answer up relative to the rejected one, measured from the base (0 before the first step).
# ORPO's and SimPO's have no reference: they are beta x the answer's average log-prob per token, so their
# "accuracy" says whether the model gives the chosen answer the higher average log-prob at all, which the base
# often does before any step. Those get names of their own: chosen_preferred and the log-prob margin.
RELATIVE = {"rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin",
            "rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected"}
ABSOLUTE = {"rewards/accuracies": "chosen_preferred", "logps/chosen": "logp_chosen",
            "logps/rejected": "logp_rejected"}
LOGP_MARGIN = {"logp_margin": ("logp_chosen", "logp_rejected")}  # TRL's two logged means, subtracted
REWARD_CURVES = (
    Curve("reward_accuracy", "reward accuracy", "share of pairs whose chosen answer gained more log-prob than the "
          "rejected one, relative to the reference (dpo)", "title"),
    Curve("reward_margin", "reward margin (chosen - rejected)", "beta x (chosen's - rejected's log-prob gain over "
          "the reference), mean over pairs (dpo; kto: mean desirable - mean undesirable)", "line"),
    Curve("reward_chosen", "reward chosen", "beta x the chosen (desirable) answer's log-prob gain over the reference"),
    Curve("reward_rejected", "reward rejected", "beta x the rejected (undesirable) answer's log-prob gain over the "
          "reference"),
)
LOGP_CURVES = (
    Curve("chosen_preferred", "chosen preferred", "share of pairs whose chosen answer has the higher average "
          "log-prob per token (absolute, no reference: orpo, simpo)", "title"),
    Curve("logp_margin", "log-prob margin (chosen - rejected)", "chosen's - rejected's average log-prob per token, "
          "mean over pairs (orpo, simpo)", "line"),
    Curve("logp_chosen", "log-prob chosen", "the chosen answer's average log-prob per token"),
    Curve("logp_rejected", "log-prob rejected", "the rejected answer's average log-prob per token"),
)
# Why a key of another objective does not apply to one without a reference.
NO_REFERENCE = "it needs a reference model, and {name} has none"
ANSWERS_ONLY = "its loss compares the answers' log-probs, and the prompt is what they answer"


def beta(default: float, help_text: str) -> Param:
    return Param("beta", "float", default, help_text, min=0.0, min_exclusive=True)


def loss_type(variants: tuple[str, ...]) -> Param:
    # Checked by `variants_check` (one line naming the objective's variants), not by `choices`.
    return Param("loss_type", "str", variants[0], f"TRL's loss variant: {', '.join(variants)}.")


PRECOMPUTE_REF = Param("precompute_ref", "bool", False, "Compute the reference log-probs of every pair once before "
                       "training instead of once per step; always so for methods that train the base.")


def variants_check(name: str, variants: tuple[str, ...]) -> Validate:
    """The objective's `validate`: `loss_type` one of its TRL variants."""
    def check(options: dict[str, Any], config: RunConfig) -> None:
        if options["loss_type"] not in variants:
            hint = did_you_mean(options["loss_type"], variants)
            raise ConfigError(f"`loss_type: {options['loss_type']}` is no {name} loss.{hint} {name} has: "
                              f"{', '.join(variants)}.", field="loss_type")
    return check


def _second_adapter(method: MethodSpec, options: dict[str, Any]) -> str | None:
    if not method.allows_second_adapter(options):
        return f"peft allows one {method.name} adapter per model"
    if method.adds_modules(options) and not method.keeps_base(options):
        return "its initialisation rewrites the base weights, and the copy would initialise (and rewrite) again"
    return None


# Objectives with a reference refuse the methods whose adapter cannot have TRL's frozen copy beside it (after
# the method's options are checked: PiSSA is an `init` of lora).
REFERENCE_COPY = MethodRefusal(_second_adapter, because="TRL keeps a frozen copy of the adapter beside it as the "
                               "reference", fix="Use plain lora (or dora), or `objective: orpo` / `simpo`, which "
                               "need no reference.")


def reference_for(reference: bool, method: Any, options: dict[str, Any], precompute: bool, is_peft: bool) -> str:
    """Where the reference log-probs come from: 'none' (no `reference`: orpo, simpo), 'adapter_off' (the base,
    adapter switched off at every step) or 'precomputed' (once, before the first step; see the module doc)."""
    if not reference:
        return "none"
    if precompute or not is_peft or not method.keeps_base(options):
        return "precomputed"
    return "adapter_off"


@dataclass(frozen=True)
class TrlPairs:
    """One preference objective on TRL: its trainer and config classes, and what differs between them. Its
    methods are the objective's hooks (`ObjectiveSpec.tokenize`, `trainer`, `check_data`, `preview`, ...)."""

    name: str
    module: str  # where TRL keeps the two classes
    trainer_name: str
    config_name: str
    formats: tuple[str, ...] = ("preference",)
    reference: bool = False  # TRL compares with a reference model: nbtune's is the base (`reference_for`)
    unpaired: bool = False  # learns from single answers labelled desirable or not, read in order (KTO)
    pair_forward: bool = False  # TRL's ORPO / CPO trainers: nbtune's forward and token count mixed in
    passes: tuple[str, ...] = ("beta",)  # the objective's keys TRL's config takes as they are
    fixed: tuple[tuple[str, Any], ...] = ()  # TRL config values the objective fixes

    def check_data(self, config: RunConfig, fmt: str, dataset: Any, field: str) -> None:
        """Refuse data that is no preferences, naming its columns and what would do; then every row."""
        from nbtune.data.preference import check_rows

        if fmt not in self.formats:
            first, *others = [COLUMNS[f] for f in self.formats]
            needs = first + "".join(f" (or {c})" for c in others)
            raise DataError(f"`objective: {self.name}` learns from preferences: `data` needs columns {needs}, and it "
                            f"has {dataset.column_names}. Use `data: demo_pairs` to try it, or `objective: sft` for "
                            "this data.", field=field)
        check_rows(fmt, dataset, field)

    def tokenize(self, train_records: Any, eval_records: Any, fmt: str, tokenizer: Any,
                 config: RunConfig) -> tuple[Any, Any]:
        """Conversational rows with a `length` column (TRL tokenises them with the chat template itself)."""
        from nbtune.data.preference import preference_rows

        train = preference_rows(train_records, fmt, tokenizer=tokenizer, field="data")
        evaluation = (preference_rows(eval_records, fmt, tokenizer=tokenizer, field="eval_data")
                      if eval_records is not None else None)
        if self.unpaired:
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
        precompute = bool(config.objective_options.get("precompute_ref", False))
        reference = reference_for(self.reference, run.method, config.options, precompute, hasattr(model, "peft_config"))
        trainer_class, config_class = trl_classes(self)
        args = config_class(**{**values, **self.settings(config, reference)})
        callbacks = run_callbacks(run, memory, guard, shared_stop, args.world_size)
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
        options = config.objective_options
        settings: dict[str, Any] = {
            **{key: options[key] for key in self.passes},
            "max_length": config.max_length,
            "disable_dropout": False,  # the method's own `dropout` option says what dropout there is
            "train_sampling_strategy": "sequential" if self.unpaired else "random",
        }
        if self.reference:
            settings["precompute_ref_log_probs"] = reference == "precomputed"
            settings["remove_unused_columns"] = True  # only TRL's tokenised columns reach its collator
        settings.update(self.fixed)
        return settings

    def trainer_class(self) -> type:
        """nbtune's Trainer class for this objective (TRL's, with nbtune's pieces mixed in)."""
        return trl_classes(self)[0]

    def preview(self, config: RunConfig, tokenizer: Any, n: int, train: Any, fmt: str) -> BatchPreview:
        from nbtune.objectives.pair_preview import preview_pairs

        return preview_pairs(self, config, tokenizer, n, train, fmt)

    def preview_header(self, preview: BatchPreview) -> str:
        from nbtune.objectives.pair_preview import pairs_header

        return pairs_header(preview, appends_eos=self.pair_forward)


@cache
def trl_classes(trl: TrlPairs) -> tuple[type, type]:
    """(nbtune's Trainer for `trl`: TRL's with nbtune's checkpoints and data order, TRL's config class)."""
    from nbtune.engine.training.checkpoints import AtomicCheckpoints
    from nbtune.engine.training.sampling import DataOrder

    with quiet_trl():
        module = importlib.import_module(trl.module)
    own = (_PairForward, _PairTokens) if trl.pair_forward else ()
    bases = (AtomicCheckpoints, DataOrder, _AsARun, *own, getattr(module, trl.trainer_name))
    return type(f"Run{trl.trainer_name}", bases, {}), getattr(module, trl.config_name)


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




__all__ = ["ABSOLUTE", "ANSWERS_ONLY", "KIND", "LOGP_CURVES", "LOGP_MARGIN", "NO_REFERENCE", "PRECOMPUTE_REF",
           "REFERENCE_COPY", "RELATIVE", "REWARD_CURVES", "TrlPairs", "beta", "drop_reference_copy", "loss_type",
           "reference_for", "trl_classes", "unpatched_forward", "variants_check"]
