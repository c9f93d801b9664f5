"""The evaluation keys of a `RunConfig`, checked with their fixes before any data is read: `metric` (names,
'module:function' paths, functions), `cv` / `cv_fold`, `sample_prompts`, and a `sweep` block (which
compares trials by what they evaluate; nbtune/config/sweep_space.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nbtune.errors import ConfigError, NbtuneError

if TYPE_CHECKING:
    from nbtune.config import RunConfig


def check_metric_spec(spec: Any) -> Any:
    """`metric` checked by name (did-you-mean) before anything loads; see engine/evaluation/metrics.py."""
    from nbtune.engine.evaluation.metrics import check_metric_spec as check  # no torch: sacrebleu and rouge come later

    return check(spec)


def metric_text(spec: Any) -> Any:
    """`metric` as YAML and JSON can hold it: a function by its import path (one defined in a notebook cannot
    be written down, and is left out)."""
    from nbtune.engine.evaluation.metrics import metric_spec_json

    return metric_spec_json(spec)


def check_evaluation_keys(config: RunConfig) -> None:
    """cv, cv_fold, sample_prompts and sweep, each refused with its fix before any data is read."""
    if config.cv == 1:
        raise ConfigError("`cv: 1` is no cross-validation: it takes 2 or more folds (e.g. cv: 5), or 0 for off.",
                          field="cv")
    if config.cv_fold is not None and not config.cv:
        raise ConfigError("`cv_fold` picks one fold of a cross-validation: set `cv` too (e.g. cv: 5).",
                          field="cv_fold")
    if config.cv_fold is not None and config.cv_fold > config.cv:
        raise ConfigError(f"`cv_fold: {config.cv_fold}` is past the last of {config.cv} folds; it is 1..{config.cv}.",
                          field="cv_fold")
    if config.cv and (config.eval_data is not None or config.eval_split):
        key = "eval_data" if config.eval_data is not None else "eval_split"
        raise ConfigError(f"`cv` holds out each fold of `data` in turn for evaluation; `{key}` would be a second "
                          f"evaluation set: remove one of them.", field=key)
    if config.sample_prompts is not None:
        from nbtune.engine.evaluation.generation import as_messages

        prompts = config.sample_prompts
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict)):
            prompts = [prompts]  # one prompt given alone
            object.__setattr__(config, "sample_prompts", prompts)  # the config is still being made (run_config)
        if not isinstance(prompts, list) or not prompts:
            raise ConfigError("`sample_prompts` is a list of prompts (text or chat messages), e.g. "
                              "sample_prompts: ['Convert ...: 4 July 1976'].", field="sample_prompts")
        for prompt in prompts:
            try:
                as_messages(prompt)
            except NbtuneError as exc:
                raise ConfigError(f"`sample_prompts`: {exc}", field="sample_prompts") from None
