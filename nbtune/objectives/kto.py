"""`objective: kto`: Kahneman-Tversky Optimization on TRL's KTOTrainer. Single answers labelled desirable or
not (prompt, completion, label), or pairs split into such answers; against a reference as DPO's
(objectives/trl_pairs.py). Its default loss estimates a KL term from the other answers of a batch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nbtune.errors import ConfigError
from nbtune.objectives import trl_pairs as pairs
from nbtune.objectives.pair_preview import PAIRS_LEGEND
from nbtune.objectives.registry import Curve, ObjectiveSpec, register_objective

if TYPE_CHECKING:
    from nbtune.config import RunConfig

NAME = "kto"
LOSS_TYPES = ("kto", "apo_zero_unpaired")  # TRL 1.16's (kto_config.py); the first is TRL's default
WITH_KL = "kto"  # the variant whose KL estimate needs other answers in the batch
SCORES = ("the loss compares each answer's summed log-prob over its [[...]] tokens with the reference's (the base's): "
          "desirable (a pair's chosen) up, undesirable (its rejected) down; prompt tokens are context only")
TRL = pairs.TrlPairs(NAME, "trl", "KTOTrainer", "KTOConfig", formats=("preference", "unpaired"), reference=True,
                     unpaired=True, passes=("beta", "loss_type"))
_variants = pairs.variants_check(NAME, LOSS_TYPES)


def validate(options: dict[str, Any], config: RunConfig) -> None:
    _variants(options, config)
    if options["loss_type"] == WITH_KL and config.batch_size < 2:
        raise ConfigError("`objective: kto` estimates its KL term from the other answers of a batch, so it needs "
                          "`batch_size` 2 or more (use grad_accum to keep the effective batch).", field="batch_size")


register_objective(ObjectiveSpec(
    name=NAME,
    summary="single answers labelled desirable or not, or pairs split into such answers (TRL's KTOTrainer)",
    kind=pairs.KIND,
    params=(pairs.beta(0.1, "Preference strength: how far from the reference the model may move (TRL's beta)."),
            pairs.loss_type(LOSS_TYPES), pairs.PRECOMPUTE_REF),
    validate=validate,
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
    log_keys={**pairs.RELATIVE, "kl": "kl"},
    curves=(*pairs.REWARD_CURVES, Curve("kl", "KL", "KTO's estimate of the KL divergence from the reference "
                                        "(mismatched prompt/answer pairs)")),
    columns=("reward_margin",),  # KTO has no pairs to be right about: no reward accuracy
))
