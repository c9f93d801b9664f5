"""`objective:` what a run learns from, and the settings only preference objectives have.

    sft      the answers (today's supervised fine-tuning; the default)
    dpo      pairs: raise the chosen answer's likelihood over the rejected one's, against a reference
             (TRL's DPOTrainer; `loss_type` picks its variant: sigmoid, ipo, hinge, robust, ...)
    orpo     pairs: the chosen answer's NLL (the whole chat with `train_on_prompt`) plus an odds-ratio term
             favouring the chosen answer over the rejected one; no reference
    simpo    pairs: length-normalised margin, no reference (TRL's CPOTrainer with loss_type simpo, no NLL term)
    kto      single answers labelled desirable or not, or pairs split into such answers (TRL's KTOTrainer)

Checked here, before any data is read: a preference setting on an `sft` run, a loss variant the objective
does not have, a reference option where there is no reference, and combinations TRL would refuse later
(KTO's KL estimate needs at least two examples per batch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nbtune.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from nbtune.config import RunConfig

PAIRWISE = ("dpo", "orpo", "simpo")
PREFERENCE = (*PAIRWISE, "kto")
DEFAULT_BETA = {"dpo": 0.1, "kto": 0.1, "orpo": 0.1, "simpo": 2.0}
# TRL 1.16's loss variants (dpo_config.py, kto_config.py); ORPO and SimPO have one loss each.
LOSS_TYPES = {
    "dpo": ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
            "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm"),
    "kto": ("kto", "apo_zero_unpaired"),
}
WITH_REFERENCE = ("dpo", "kto")
# TRL's logged names -> the run's, per objective: history records per step, `run.metrics` from the last
# evaluation (`preference_values`). TRL calls two different things "rewards". DPO's and KTO's are implicit
# rewards, beta x the answer's log-prob ratio to the reference: a reward accuracy of 1.0 says the tuned model
# moved every chosen answer up relative to the rejected one, measured from the base (0 before the first step).
# ORPO's and SimPO's have no reference: they are beta x the answer's average log-prob per token, so their
# "accuracy" says whether the model gives the chosen answer the higher average log-prob at all, which the base
# often does before any step. Those get names of their own: chosen_preferred and the log-prob margin.
_RELATIVE = {"rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin",
             "rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected"}
_ABSOLUTE = {"rewards/accuracies": "chosen_preferred", "logps/chosen": "logp_chosen",
             "logps/rejected": "logp_rejected"}
PREFERENCE_KEYS = {"dpo": _RELATIVE, "kto": {**_RELATIVE, "kl": "kl"},
                   "orpo": {**_ABSOLUTE, "nll_loss": "nll_loss", "log_odds_ratio": "log_odds_ratio"},
                   "simpo": _ABSOLUTE}  # SimPO's nll_loss is 0: nbtune runs it without CPO's NLL term
# What each run key means, for the panel, compare and the README (one line each).
PREFERENCE_MEANING = {
    "reward_accuracy": "share of pairs whose chosen answer gained more log-prob than the rejected one, "
                       "relative to the reference (dpo)",
    "reward_margin": "beta x (chosen's - rejected's log-prob gain over the reference), mean over pairs (dpo; kto: "
                     "mean desirable - mean undesirable)",
    "reward_chosen": "beta x the chosen (desirable) answer's log-prob gain over the reference",
    "reward_rejected": "beta x the rejected (undesirable) answer's log-prob gain over the reference",
    "kl": "KTO's estimate of the KL divergence from the reference (mismatched prompt/answer pairs)",
    "chosen_preferred": "share of pairs whose chosen answer has the higher average log-prob per token "
                        "(absolute, no reference: orpo, simpo)",
    "logp_margin": "chosen's - rejected's average log-prob per token, mean over pairs (orpo, simpo)",
    "logp_chosen": "the chosen answer's average log-prob per token",
    "logp_rejected": "the rejected answer's average log-prob per token",
    "nll_loss": "ORPO's NLL term: the chosen answer's (or with train_on_prompt the chosen chat's) mean token loss",
    "log_odds_ratio": "ORPO's odds-ratio term before beta: mean log sigmoid(log odds chosen - log odds rejected)",
}
# The held-out preference numbers `nbtune.compare` shows, in this order (each where some run has it).
COMPARE_COLUMNS = ("reward_accuracy", "reward_margin", "chosen_preferred", "logp_margin")


def preference_values(objective: str, logs: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`logs` (TRL's names, `prefix` "eval_" for an evaluation's) as the run's names for `objective`;
    {} for sft. The log-prob margin is TRL's two logged means subtracted (the same pairs on both sides)."""
    keys = PREFERENCE_KEYS.get(objective, {})
    values = {ours: logs[prefix + theirs] for theirs, ours in keys.items() if prefix + theirs in logs}
    if "logp_chosen" in values and "logp_rejected" in values:
        values["logp_margin"] = values["logp_chosen"] - values["logp_rejected"]
    return values


def is_preference(config: Any) -> bool:
    return getattr(config, "objective", "sft") in PREFERENCE


def beta_of(config: RunConfig) -> float:
    return config.beta if config.beta is not None else DEFAULT_BETA[config.objective]


def loss_type_of(config: RunConfig) -> str | None:
    if config.loss_type is not None:
        return config.loss_type
    return LOSS_TYPES[config.objective][0] if config.objective in LOSS_TYPES else None


def check_method_for_objective(config: RunConfig, method: Any) -> None:
    """Methods whose adapter cannot have TRL's frozen reference copy beside it, refused by name (after the
    method's options are checked: PiSSA is an `init` of lora)."""
    objective, options = config.objective, config.options
    if objective not in WITH_REFERENCE:
        return
    if not method.allows_second_adapter(options):
        why = f"peft allows one {method.name} adapter per model"
    elif method.adds_modules(options) and not method.keeps_base(options):
        why = "its initialisation rewrites the base weights, and the copy would initialise (and rewrite) again"
    else:
        return
    raise ConfigError(f"method {method.name!r} with these options cannot train with `objective: {objective}`: "
                      f"TRL keeps a frozen copy of the adapter beside it as the reference, and {why}. Use plain "
                      "lora (or dora), or `objective: orpo` / `simpo`, which need no reference.", field="objective")


def check_objective(config: RunConfig) -> None:
    """One line naming the setting and the fix for every objective setting that cannot work."""
    objective = config.objective
    if objective == "sft":
        for key, unset in (("beta", None), ("loss_type", None), ("precompute_ref", False)):
            if getattr(config, key) != unset:
                raise ConfigError(f"`{key}` is a preference-tuning setting and this run's `objective` is sft; set "
                                  f"`objective: dpo` (or orpo, simpo, kto), or remove `{key}`.", field=key)
        return
    if config.loss_type is not None:
        allowed = LOSS_TYPES.get(objective)
        if allowed is None:
            raise ConfigError(f"`loss_type` does not apply to `objective: {objective}` (it has one loss); remove "
                              "it, or use `objective: dpo` for its variants.", field="loss_type")
        if config.loss_type not in allowed:
            hint = did_you_mean(config.loss_type, allowed)
            raise ConfigError(f"`loss_type: {config.loss_type}` is no {objective} loss.{hint} {objective} has: "
                              f"{', '.join(allowed)}.", field="loss_type")
    if config.precompute_ref and objective not in WITH_REFERENCE:
        raise ConfigError(f"`precompute_ref` needs a reference model, and `objective: {objective}` has none; "
                          "remove it.", field="precompute_ref")
    if config.train_on_prompt and objective != "orpo":
        raise ConfigError(f"`train_on_prompt` does not apply to `objective: {objective}`: its loss compares the "
                          "answers' log-probs, and the prompt is what they answer; remove it (`objective: orpo` "
                          "takes it, for an NLL term over the whole chat).", field="train_on_prompt")
    kl_estimate = objective == "kto" and loss_type_of(config) == "kto"
    if kl_estimate and config.batch_size < 2:
        raise ConfigError("`objective: kto` estimates its KL term from the other answers of a batch, so it needs "
                          "`batch_size` 2 or more (use grad_accum to keep the effective batch).", field="batch_size")


__all__ = ["COMPARE_COLUMNS", "DEFAULT_BETA", "LOSS_TYPES", "PAIRWISE", "PREFERENCE", "PREFERENCE_KEYS",
           "PREFERENCE_MEANING", "WITH_REFERENCE", "beta_of", "check_method_for_objective", "check_objective",
           "is_preference", "loss_type_of", "preference_values"]
