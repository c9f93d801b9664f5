"""`objective: simpo`: SimPO on TRL's CPOTrainer (its `simpo` loss without CPO's NLL term, the SimPO paper's
loss). Pairs: a length-normalised margin between the answers' average log-probs; no reference model
(objectives/trl_pairs.py)."""

from __future__ import annotations

from nbtune.objectives import trl_pairs as pairs
from nbtune.objectives.pair_preview import PAIRS_LEGEND
from nbtune.objectives.registry import ObjectiveSpec, register_objective

NAME = "simpo"
SCORES = ("the loss compares the two answers' average log-prob per [[...]] token (chosen above rejected by a "
          "margin); no reference; prompt tokens are context only")
# SimPO is CPO's simpo loss with its NLL term off (cpo_alpha 0), so its logged nll_loss is 0 and not reported.
TRL = pairs.TrlPairs(NAME, "trl.experimental.cpo", "CPOTrainer", "CPOConfig", pair_forward=True,
                     fixed=(("loss_type", "simpo"), ("cpo_alpha", 0.0)))

register_objective(ObjectiveSpec(
    name=NAME,
    summary="pairs: length-normalised margin, no reference (TRL's CPOTrainer with loss_type simpo, no NLL term)",
    kind=pairs.KIND,
    params=(pairs.beta(2.0, "Scale of the margin between the answers' average log-probs (the SimPO paper's beta)."),),
    formats=TRL.formats,
    check_data=TRL.check_data,
    tokenize=TRL.tokenize,
    trainer=TRL.trainer,
    trainer_class=TRL.trainer_class,
    preview=TRL.preview,
    preview_header=TRL.preview_header,
    legend=PAIRS_LEGEND,
    scores=lambda train_on_prompt, fmt: SCORES,
    refuses={"loss_type": "it has one loss", "precompute_ref": pairs.NO_REFERENCE.format(name=NAME),
             "train_on_prompt": pairs.ANSWERS_ONLY},
    log_keys=pairs.ABSOLUTE,
    margins=pairs.LOGP_MARGIN,
    curves=pairs.LOGP_CURVES,
    columns=("chosen_preferred", "logp_margin"),
))
