"""Scoring a run on its eval rows: generate answers (tuned, and the base as a reference), score each row
with the task metrics (engine/evaluation/metrics.py), keep the rows for `run.predictions()`.

The base model's answers to the same rows are the reference every tuned number is read against. They
depend only on the base and the prompts, so the kernel keeps them: ten runs on one base and one eval set
generate the base's answers once.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbtune.data.loading import is_demo
from nbtune.engine.evaluation.generation import generate_texts
from nbtune.engine.evaluation.metrics import (
    METRICS,
    Metric,
    aggregate_scores,
    generation_metrics,
    resolve_metrics,
    score_rows,
)
from nbtune.engine.evaluation.predictions import Predictions, metric_columns, write_rows
from nbtune.errors import NbtuneError, NbtuneWarning

if TYPE_CHECKING:
    from nbtune.engine.records.run import Run

BATCH = 16  # prompts per generate call: one progress tick, one chance to honour Stop
_BASE_ANSWERS: OrderedDict[tuple[Any, ...], list[str]] = OrderedDict()
_BASE_ANSWERS_KEPT = 16


def task_metrics(run: Run, *, default_exact_match: bool = False) -> list[Metric]:
    """The generation metrics `run.config.metric` names; exact match when none is named and the caller asked
    for an evaluation anyway (`run.evaluate()`)."""
    config = run.config
    demo = is_demo(config.data)
    chosen = generation_metrics(resolve_metrics(config.metric, demo=demo))
    if not chosen and default_exact_match:
        chosen = [METRICS["exact_match"]]
    return chosen


def evaluate_run(run: Run, *, samples: int | None = None, use_adapter: bool = True, with_base: bool = True,
                 metrics: Sequence[Metric] | None = None) -> dict[str, Any]:
    """Generate and score the first `samples` eval rows (default `metric_samples`); the tuned model's scores
    are `name`, the base's `base_name`. With `use_adapter`, the rows are kept on the run (its
    `prediction_rows`) with the base's answers beside them when `with_base`."""
    run.require_model()
    if not run.eval_pairs:
        raise NbtuneError("this run has no eval data with answers; set `eval_data` or `eval_split`.",
                          field="eval_data")
    chosen = list(metrics) if metrics is not None else task_metrics(run, default_exact_match=True)
    pairs = run.eval_pairs[: samples or run.config.metric_samples]
    prompts, references = [p for p, _ in pairs], [a for _, a in pairs]
    budget = answer_budget(run.tokenizer, references)
    if not use_adapter:
        base = base_answers(run, prompts, max_new_tokens=budget)
        if base is None:
            with run.base_disabled():  # the method says why it cannot switch back to its base, where it cannot
                pass
            raise NbtuneError(f"run {run.name!r} trained on a base passed in memory that no longer exists as it "
                              "was; its base answers cannot be generated.")
        return {**_prefixed(aggregate_scores(chosen, base, references[: len(base)]), "base_"), "samples": len(base)}
    tuned = answers(run.model, run.tokenizer, prompts, max_new_tokens=budget, desc=f"{run.name}: answering",
                    should_stop=lambda: run.stop_requested)
    base = base_answers(run, prompts[: len(tuned)], max_new_tokens=budget) if with_base else None
    run.prediction_rows = prediction_rows(pairs[: len(tuned)], tuned, base, chosen)
    result = aggregate_scores(chosen, tuned, references[: len(tuned)],
                              [{m.name: r[m.name] for m in chosen} for r in run.prediction_rows])
    if base is not None:
        result.update(_prefixed(aggregate_scores(chosen, base, references[: len(base)],
                                                 [{m.name: r[f"base_{m.name}"] for m in chosen}
                                                  for r in run.prediction_rows]), "base_"))
    return {**result, "samples": len(tuned)}


def score_model(run: Run, model: Any, tokenizer: Any, *, samples: int | None = None, desc: str = "answering"
                ) -> dict[str, Any]:
    """The run's task metrics (exact match when it names none) for another model's greedy answers to the
    run's first `samples` eval rows (default `metric_samples`): a model exported and read back, say."""
    if not run.eval_pairs:
        raise NbtuneError("this run has no eval data with answers; set `eval_data` or `eval_split`.",
                          field="eval_data")
    chosen = task_metrics(run, default_exact_match=True)
    pairs = run.eval_pairs[: samples or run.config.metric_samples]
    prompts, references = [p for p, _ in pairs], [a for _, a in pairs]
    predicted = answers(model, tokenizer, prompts, max_new_tokens=answer_budget(tokenizer, references), desc=desc)
    return {**aggregate_scores(chosen, predicted, references), "samples": len(predicted)}


def score_finished_run(run: Run) -> None:
    """The config's task metrics: generated answers (tuned and base) scored row by row, and perplexity. A
    metric function that fails on some answer costs the scores, never the trained run: it is saved as usual
    and `run.evaluate()` scores it again once the function is fixed."""
    metrics = task_metrics(run)
    run.metrics.update(loss_metrics(run))
    if not (metrics and run.eval_pairs) or run.status != "finished":
        return
    try:
        run.metrics.update(evaluate_run(run, metrics=metrics))
    except NbtuneError as exc:
        run.error = f"scoring failed: {exc}"
        warnings.warn(f"run {run.name!r} trained, but {run.error} Fix the metric and call run.evaluate().",
                      NbtuneWarning, stacklevel=4)


def check_metrics_on_data(config: Any, evaluation: Any, fmt: str) -> None:
    """Before any weights load, the metric functions on the first eval row (its reference against itself): a
    function that raises on this data is named now, not after training."""
    from nbtune.data import prompts_and_answers

    demo = is_demo(config.data)
    chosen = generation_metrics(resolve_metrics(config.metric, demo=demo))
    if not chosen or evaluation is None or fmt == "text" or len(evaluation) == 0:
        return
    pairs = prompts_and_answers(evaluation.select(range(1)), fmt)
    if pairs:
        score_rows(chosen, [pairs[0][1]], [pairs[0][1]])


def predictions_table(run: Run, *, wrong: bool = False, changed: bool = False, by: str | None = None,
                      regenerate: bool = False) -> Predictions:
    """`run.predictions()`: the scored rows (generated now when there are none, or with `regenerate`, and then
    written beside the run's saved run.json), worst first, filtered."""
    metrics = task_metrics(run, default_exact_match=True)
    if regenerate or not run.prediction_rows:
        run.metrics.update(evaluate_run(run))
        if run.owns_saved_folder():
            write_rows(Path(run.saved_to), run.prediction_rows)
    scored = metric_columns(run.prediction_rows)  # with the scores of functions of another kernel, kept
    names = [m.name for m in metrics if m.name in scored] + [n for n in scored if n not in {m.name for m in metrics}]
    table = Predictions(run.prediction_rows, names, run=run.name, best={m.name: m.best for m in metrics}).sort(by)
    if wrong:
        table = table.wrong()
    return table.changed() if changed else table


def loss_metrics(run: Run) -> dict[str, float]:
    """perplexity = exp(eval_loss) when the config names it and the Trainer evaluated a loss."""
    names = [m.name for m in resolve_metrics(run.config.metric, demo=False) if m.kind == "loss"]
    loss = run.metrics.get("eval_loss")
    if "perplexity" in names and isinstance(loss, (int, float)):
        return {"perplexity": math.exp(min(loss, 700.0))}  # exp(710) overflows a float
    return {}


def prediction_rows(pairs: Sequence[tuple[Any, str]], tuned: Sequence[str], base: Sequence[str] | None,
                    metrics: Sequence[Metric]) -> list[dict[str, Any]]:
    """One dict per row: row, prompt, reference, base, tuned, each metric for tuned and (base_) base."""
    references = [a for _, a in pairs]
    tuned_scores = score_rows(metrics, tuned, references)
    base_scores = score_rows(metrics, base, references) if base is not None else None
    rows = []
    for i, (messages, reference) in enumerate(pairs):
        row = {"row": i, "prompt": prompt_text(messages), "reference": reference,
               "base": base[i] if base is not None else None, "tuned": tuned[i], **tuned_scores[i]}
        if base_scores is not None:
            row.update(_prefixed(base_scores[i], "base_"))
        rows.append(row)
    return rows


def prompt_text(messages: Any) -> str:
    """The prompt as a person reads it: the user's text, or 'role: text' lines for a longer conversation."""
    if isinstance(messages, str):
        return messages
    if len(messages) == 1:
        return str(messages[0]["content"])
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def answer_budget(tokenizer: Any, references: Sequence[str]) -> int:
    """New tokens allowed per answer: the longest reference's length and 4 more (an answer longer than every
    reference is wrong anyway, and generating on would only cost time)."""
    longest = max((len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references), default=28)
    return longest + 4


def answers(model: Any, tokenizer: Any, prompts: Sequence[Any], *, max_new_tokens: int, desc: str,
            should_stop: Callable[[], bool] = lambda: False) -> list[str]:
    """Greedy answers in batches under a progress bar (engine/training/progress.py: never a widget a saved notebook
    cannot show). A Stop (`should_stop()`) ends it after the current batch: the rows answered so far are
    returned. Ctrl-C goes through as it is."""
    from nbtune.engine.training.progress import progress_bar

    out: list[str] = []
    with progress_bar(total=len(prompts), desc=desc, unit="row") as bar:
        for start in range(0, len(prompts), BATCH):
            if should_stop():
                break
            chunk = list(prompts[start:start + BATCH])
            out += generate_texts(model, tokenizer, chunk, max_new_tokens=max_new_tokens, batch_size=BATCH)
            bar.update(len(chunk))
    return out


def base_answers(run: Run, prompts: Sequence[Any], *, max_new_tokens: int) -> list[str] | None:
    """The unmodified base model's answers, kept per (base, prompts, length) for the kernel's life: from the
    run's model with its adapter switched off when that leaves exactly its base (not a 4-bit or 8-bit one,
    nor one PiSSA rewrote), else from the process's cached base loaded unquantized. None when the base was
    passed in memory and no longer exists as it was."""
    import json

    in_memory = run.trained_on_a_base_in_memory
    key = (run.base_name, run.config.model, run.config.dtype, max_new_tokens,
           json.dumps([prompt_text(p) for p in prompts], ensure_ascii=False))
    if not in_memory and key in _BASE_ANSWERS:
        _BASE_ANSWERS.move_to_end(key)
        return list(_BASE_ANSWERS[key])
    found = _generate_base_answers(run, prompts, max_new_tokens)
    if found is not None and not in_memory:
        _BASE_ANSWERS[key] = found
        while len(_BASE_ANSWERS) > _BASE_ANSWERS_KEPT:
            _BASE_ANSWERS.popitem(last=False)
    return found


def _generate_base_answers(run: Run, prompts: Sequence[Any], max_new_tokens: int) -> list[str] | None:
    desc = "base model: answering"
    if run.model is not None and run.method.keeps_base(run.config.options) and not run.context.quantized:
        with run.base_disabled():
            return answers(run.model, run.tokenizer, prompts, max_new_tokens=max_new_tokens, desc=desc)
    if run.trained_on_a_base_in_memory:
        return None  # loading `config.model` could give another model
    from nbtune.engine.bases.kernel_cache import cached_base

    config = run.config  # the base unquantized, in the run's dtype: the kernel's cached one, or loaded once
    base = cached_base(config.model, quantization="none", dtype=config.dtype,
                       trust_remote_code=config.trust_remote_code)
    return answers(base.model, run.tokenizer, prompts, max_new_tokens=max_new_tokens, desc=desc)


def _prefixed(scores: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {f"{prefix}{k}": v for k, v in scores.items()}
