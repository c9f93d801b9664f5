"""`objective: dpo`: Direct Preference Optimization on TRL's DPOTrainer. Pairs (prompt, chosen, rejected):
raise the chosen answer's likelihood over the rejected one's, relative to a reference, which is the base
itself (the adapter switched off) or its log-probs computed before the first step (objectives/trl_pairs.py).
`loss_type` picks TRL's variant; `beta` how far from the reference the model may move."""

from __future__ import annotations

from nbtune.objectives import trl_pairs as pairs
from nbtune.objectives.pair_preview import PAIRS_LEGEND
from nbtune.objectives.registry import ObjectiveSpec, register_objective

NAME = "dpo"
# TRL 1.16's DPO loss variants (dpo_config.py); the first is TRL's default.
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm")
SCORES = ("the loss compares each answer's summed log-prob over its [[...]] tokens with the reference's (the base's): "
          "chosen up, rejected down, relative to it; prompt tokens are context only")
TRL = pairs.TrlPairs(NAME, "trl", "DPOTrainer", "DPOConfig", reference=True, passes=("beta", "loss_type"))

register_objective(ObjectiveSpec(
    name=NAME,
    summary="pairs: raise the chosen answer's likelihood over the rejected one's, against a reference (TRL's "
            "DPOTrainer; `loss_type` picks its variant: sigmoid, ipo, hinge, robust, ...)",
    kind=pairs.KIND,
    params=(pairs.beta(0.1, "Preference strength: how far from the reference the model may move (TRL's beta)."),
            pairs.loss_type(LOSS_TYPES), pairs.PRECOMPUTE_REF),
    validate=pairs.variants_check(NAME, LOSS_TYPES),
    formats=TRL.formats,
    check_data=TRL.check_data,
    tokenize=TRL.tokenize,
    trainer=TRL.trainer,
    trainer_class=TRL.trainer_class,
    preview=TRL.preview,
    preview_header=TRL.preview_header,
    legend=PAIRS_LEGEND,
    scores=lambda train_on_prompt, fmt: SCORES,
    refuses={"train_on_prompt": pairs.ANSWERS_ONLY},
    method_refusals=(pairs.REFERENCE_COPY,),
    log_keys=pairs.RELATIVE,
    curves=pairs.REWARD_CURVES,
    columns=("reward_accuracy", "reward_margin"),
))
