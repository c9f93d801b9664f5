"""`objective: orpo`: Odds Ratio Preference Optimization on TRL's ORPOTrainer. Pairs: the chosen answer's NLL
(the whole chosen chat with `train_on_prompt`) plus an odds-ratio term favouring the chosen answer over the
rejected one, weighted by `beta` (the paper's lambda); no reference model (objectives/trl_pairs.py)."""

from __future__ import annotations

from nbtune.objectives import trl_pairs as pairs
from nbtune.objectives.pair_preview import PAIRS_LEGEND
from nbtune.objectives.registry import Curve, ObjectiveSpec, register_objective

NAME = "orpo"
SCORES = ("the loss is the chosen answer's NLL (its [[...]] tokens) plus an odds-ratio term on both answers' "
          "average log-prob per [[...]] token; no reference; prompt tokens are context only")
WHOLE_CHAT = ("the loss is the chosen chat's NLL over every token, prompt included (`train_on_prompt`: the chosen "
              "side's [[...]]), plus an odds-ratio term on both answers' average log-prob per answer token (the "
              "rejected side's [[...]], the answer part of the chosen's); no reference")
TRL = pairs.TrlPairs(NAME, "trl.experimental.orpo", "ORPOTrainer", "ORPOConfig", pair_forward=True)

register_objective(ObjectiveSpec(
    name=NAME,
    summary="pairs: the chosen answer's NLL (the whole chat with `train_on_prompt`) plus an odds-ratio term "
            "favouring the chosen answer over the rejected one; no reference (TRL's ORPOTrainer)",
    kind=pairs.KIND,
    params=(pairs.beta(0.1, "Weight of the odds-ratio term against the NLL term (the ORPO paper's lambda)."),),
    formats=TRL.formats,
    check_data=TRL.check_data,
    tokenize=TRL.tokenize,
    trainer=TRL.trainer,
    trainer_class=TRL.trainer_class,
    preview=TRL.preview,
    preview_header=TRL.preview_header,
    legend=PAIRS_LEGEND,
    scores=lambda train_on_prompt, fmt: WHOLE_CHAT if train_on_prompt else SCORES,
    train_on_prompt="for an NLL term over the whole chat",
    refuses={"loss_type": "it has one loss", "precompute_ref": pairs.NO_REFERENCE.format(name=NAME)},
    log_keys={**pairs.ABSOLUTE, "nll_loss": "nll_loss", "log_odds_ratio": "log_odds_ratio"},
    margins=pairs.LOGP_MARGIN,
    curves=(*pairs.LOGP_CURVES,
            Curve("nll_loss", "NLL", "ORPO's NLL term: the chosen answer's (or with train_on_prompt the chosen "
                  "chat's) mean token loss"),
            Curve("log_odds_ratio", "log odds ratio", "ORPO's odds-ratio term before beta: mean log sigmoid(log "
                  "odds chosen - log odds rejected)")),
    columns=("chosen_preferred", "logp_margin"),
))
