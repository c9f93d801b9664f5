"""Task metrics: how generated answers score against their references, and whether one run beats another.

`metric:` in a run config takes one name or a list: exact_match, token_f1, rouge_l, bleu, chrf, eval_loss,
perplexity, a 'module:function' path, or a Python function (prediction, reference) -> float. The config
checks names here (`check_metric_spec`, no heavy imports); the run resolves them (`resolve_metrics`), scores
each eval row (`score_rows`) and the whole set (`aggregate_scores`). `paired_bootstrap` says how sure a
difference between two runs' answers on the same rows is.

>>> metrics = resolve_metrics(["exact_match", "token_f1"], demo=False)
>>> score_rows(metrics, ["Paris", "in Paris, France"], ["Paris", "Paris"])
[{'exact_match': 1.0, 'token_f1': 1.0}, {'exact_match': 0.0, 'token_f1': 0.5}]
>>> aggregate_scores(metrics, ["Paris", "in Paris, France"], ["Paris", "Paris"])
{'exact_match': 0.5, 'token_f1': 0.75}
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
import string
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from nbtune.errors import ConfigError, NbtuneError, did_you_mean

RowFn = Callable[[str, str], float]
CorpusFn = Callable[[Sequence[str], Sequence[str]], float]
StatsFn = Callable[[Sequence[str], Sequence[str]], tuple[list[list[float]], Callable[[Any], float]]]

SPECIAL = ("auto", "none")


@dataclass(frozen=True)
class Metric:
    """A task metric: a score per answer (`row`) and for a set of answers (`corpus`, else the mean of rows)."""

    name: str
    row: RowFn | None  # (prediction, reference) -> score; None for the loss metrics
    corpus: CorpusFn | None = None
    kind: str = "generation"  # "generation" (scores answers) or "loss" (read from the Trainer's evaluation)
    best: float = 1.0  # a perfect answer's score
    description: str = ""
    # Sentence counts whose sum gives the corpus score (sacrebleu's): the bootstrap then resamples by adding
    # counts instead of tokenising every sample again, as sacrebleu's own paired test does.
    corpus_stats: StatsFn | None = None

    def aggregate(self, predictions: Sequence[str], references: Sequence[str],
                  row_scores: Sequence[float] | None = None) -> float:
        """The score of all rows: the corpus score, else the mean of the row scores (computed when not given)."""
        if self.kind != "generation":
            raise _from_loss(self)
        _check_lengths(predictions, references)
        if not references:
            return math.nan
        if self.corpus is not None:
            return float(self.corpus(list(predictions), list(references)))
        scores = _row_scores(self, predictions, references) if row_scores is None else list(row_scores)
        _check_lengths(scores, references, "row scores")
        return math.fsum(scores) / len(scores)


def _exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


# token_f1 follows the official SQuAD evaluation script (normalize_answer, f1_score): no maintained package
# exposes it offline (HF `evaluate` fetches its metric scripts from the hub), and it is a dozen lines.
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _squad_tokens(text: str) -> list[str]:
    return _ARTICLES.sub(" ", text.lower().translate(_NO_PUNCTUATION)).split()


def _token_f1(prediction: str, reference: str) -> float:
    predicted, wanted = _squad_tokens(prediction), _squad_tokens(reference)
    if not predicted or not wanted:
        return float(predicted == wanted)  # both empty agree (SQuAD v2.0's rule for no-answer)
    same = sum((Counter(predicted) & Counter(wanted)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(wanted)
    return 2 * precision * recall / (precision + recall)


@cache
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer  # imported on first use: `import nbtune` stays cheap

    return rouge_scorer.RougeScorer(["rougeL"])


def _rouge_l(prediction: str, reference: str) -> float:
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure  # rouge_score takes (target, prediction)


@cache
def _sacrebleu(kind: str) -> Any:
    """sacrebleu's metric objects, made once; "sentence_bleu" smooths short answers with effective order."""
    from sacrebleu.metrics import BLEU, CHRF

    return {"sentence_bleu": lambda: BLEU(effective_order=True), "bleu": BLEU, "chrf": CHRF}[kind]()


def _sacrebleu_metric(name: str, sentence: str, description: str) -> Metric:
    """bleu or chrf: a sentence score per row, the corpus score of all rows, and counts for the bootstrap."""
    def counts(predictions: Sequence[str], references: Sequence[str]) -> tuple[list[list[float]], Callable]:
        # The two methods sacrebleu.significance's own paired bootstrap uses (underscored, yet sacrebleu's API).
        metric = _sacrebleu(name)
        return (metric._extract_corpus_statistics(list(predictions), [list(references)]),
                lambda total: float(metric._compute_score_from_stats(total).score))

    return Metric(name, lambda p, r: _sacrebleu(sentence).sentence_score(p, [r]).score,
                  lambda ps, rs: _sacrebleu(name).corpus_score(list(ps), [list(rs)]).score,
                  best=100.0, description=description, corpus_stats=counts)


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("exact_match", _exact_match, description="1 when the answer equals the reference after trimming "
           "whitespace, else 0."),
    Metric("token_f1", _token_f1, description="SQuAD's token F1: word overlap of answer and reference, "
           "ignoring case, punctuation and a/an/the."),
    Metric("rouge_l", _rouge_l, description="ROUGE-L F-measure (longest common word subsequence; Google's "
           "rouge_score). It keeps only a-z and 0-9: text in other scripts scores 0, use chrf there."),
    _sacrebleu_metric("bleu", "sentence_bleu", "sacreBLEU, 0-100: corpus BLEU over the rows; per row, sentence "
                      "BLEU (effective order)."),
    _sacrebleu_metric("chrf", "chrf", "chrF (sacrebleu), 0-100: character n-gram F-score; suits short answers "
                      "and any script."),
    Metric("eval_loss", None, kind="loss", best=0.0, description="The Trainer's evaluation loss on the eval "
           "rows (no generation)."),
    Metric("perplexity", None, kind="loss", best=1.0, description="exp(eval_loss): the Trainer's evaluation "
           "loss as perplexity (no generation)."),
)}

# Names people reach for, pointed at ours (suggestions only: one name per idea).
_HINTS = {"em": "exact_match", "accuracy": "exact_match", "f1": "token_f1", "rougel": "rouge_l", "rouge-l": "rouge_l",
          "sacrebleu": "bleu", "chrf++": "chrf", "loss": "eval_loss", "ppl": "perplexity"}
_OTHERS = "a 'module:function' path or a function (prediction, reference) -> float"


def check_metric_spec(spec: Any) -> Any:
    """`metric` checked without heavy imports: 'auto' / 'none', else a list of names, 'module:function' paths
    and functions (one item becomes a one-item list; duplicates dropped, order kept). Raises ConfigError."""
    if spec is None:  # YAML's `metric:` left empty
        spec = "none"
    if isinstance(spec, str):
        text = spec.strip()
        if text.lower() in SPECIAL:
            return text.lower()
        spec = [part for part in text.split(",") if part.strip()]  # "exact_match, bleu", as a CLI value
    elif not isinstance(spec, (list, tuple)):
        spec = [spec]  # a function; anything else is refused by _check_item
    if not spec:
        raise ConfigError("`metric` is empty; name metrics, or give 'none' for no generation at the end.",
                          field="metric")
    checked: list[Any] = []
    for item in spec:
        item = _check_item(item)
        if not any(item is seen or (isinstance(item, str) and item == seen) for seen in checked):
            checked.append(item)
    return checked


def _check_item(item: Any) -> Any:
    if isinstance(item, str):
        text = item.strip()
        if ":" in text:
            _import_path(text)
            return text
        name = text.lower()
        if name in METRICS:
            return name
        if name in SPECIAL:
            raise ConfigError("`metric`: 'auto' and 'none' stand alone, not in a list of metrics.", field="metric")
        hint = did_you_mean(name, [*METRICS, *SPECIAL]) or did_you_mean(_HINTS.get(name, ""), METRICS)
        raise ConfigError(f"`metric` names {text!r}, which is no metric nbtune knows.{hint} Metrics: "
                          f"{', '.join(METRICS)}, {_OTHERS}.", field="metric")
    if callable(item):
        _check_signature(item, _label(item))
        return item
    raise ConfigError(f"`metric` got {type(item).__name__} {_excerpt(item)}; a metric is a name "
                      f"({', '.join(METRICS)}), {_OTHERS}.", field="metric")


def _import_path(path: str) -> Callable[..., Any]:
    """The callable a 'module:function' path names (the function may be dotted: 'module:Class.method')."""
    module_name, _, attribute = path.partition(":")
    if not module_name.strip() or not attribute.strip():
        raise ConfigError(f"`metric` {path!r} is not a 'module:function' path (e.g. 'my_metrics:keyword_hits').",
                          field="metric")
    try:
        found: Any = importlib.import_module(module_name.strip())
    except Exception as exc:  # a missing module, or any error its code raises while importing
        raise ConfigError(f"`metric` {path!r}: importing {module_name!r} failed: {type(exc).__name__}: "
                          f"{_first_line(exc)} (is its folder on sys.path?)", field="metric") from None
    for part in attribute.strip().split("."):
        if not hasattr(found, part):
            names = [n for n in dir(found) if not n.startswith("_")]
            raise ConfigError(f"`metric` {path!r}: {getattr(found, '__name__', found)!s} has no `{part}`."
                              f"{did_you_mean(part, names)}", field="metric")
        found = getattr(found, part)
    if not callable(found):
        raise ConfigError(f"`metric` {path!r} is a {type(found).__name__}, not a function (prediction, reference) "
                          f"-> float.", field="metric")
    _check_signature(found, repr(path))
    return found


def _check_signature(fn: Callable[..., Any], label: str) -> None:
    try:
        inspect.signature(fn).bind("prediction", "reference")
    except ValueError:  # some builtins have no signature: their first call will tell
        return
    except TypeError as exc:
        raise ConfigError(f"`metric` {label} must take two arguments (prediction, reference): {exc}.",
                          field="metric") from None


def metric_spec_json(spec: Any) -> Any:
    """`metric` as JSON and YAML hold it: a function by its 'module:qualname' path, or left out when it has
    none (a lambda, a nested function, one defined in a notebook). A list left empty becomes 'none'."""
    if spec is None or isinstance(spec, str):
        return spec
    items = spec if isinstance(spec, (list, tuple)) else [spec]
    kept = [path for path in (i if isinstance(i, str) else _path_of(i) for i in items) if path is not None]
    return kept if kept else "none"


def _path_of(fn: Any) -> str | None:
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or module == "__main__" or "<" in qualname:
        return None  # "<lambda>", "<locals>": nothing an import could find again
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return f"{module}:{qualname}" if found is fn else None  # the path must give back this very object


def resolve_metrics(spec: Any, *, demo: bool) -> list[Metric]:
    """The Metric objects a `metric` spec names: 'auto' is exact_match for the demo task, else none."""
    spec = check_metric_spec(spec)
    if spec == "auto":
        return [METRICS["exact_match"]] if demo else []
    if spec == "none":
        return []
    taken = {item for item in spec if isinstance(item, str) and item in METRICS}
    metrics: list[Metric] = []
    for item in spec:
        metric = METRICS.get(item) if isinstance(item, str) else None
        if metric is None:  # a function, or a 'module:function' path to one
            metric = _custom(_import_path(item) if isinstance(item, str) else item, taken)
            taken.add(metric.name)
        metrics.append(metric)
    return metrics


def _custom(fn: Callable[..., Any], taken: set[str]) -> Metric:
    base = getattr(fn, "__name__", "")
    base = base if isinstance(base, str) and base.isidentifier() else "custom"  # a lambda's is "<lambda>"
    name, number = base, 2
    while name in taken:
        name, number = f"{base}_{number}", number + 1
    return Metric(name, fn, description=f"{_label(fn)}: a function (prediction, reference) -> float.")


def generation_metrics(metrics: Sequence[Metric]) -> list[Metric]:
    """Those that score generated answers (the loss metrics come from the Trainer)."""
    return [m for m in metrics if m.kind == "generation"]


def score_rows(metrics: Sequence[Metric], predictions: Sequence[str],
               references: Sequence[str]) -> list[dict[str, float]]:
    """Each row's {metric name: score} for the generation metrics, rows in order."""
    _check_lengths(predictions, references)
    columns = {m.name: _row_scores(m, predictions, references) for m in generation_metrics(metrics)}
    return [{name: scores[i] for name, scores in columns.items()} for i in range(len(references))]


def aggregate_scores(metrics: Sequence[Metric], predictions: Sequence[str], references: Sequence[str],
                     rows: list[dict[str, float]] | None = None) -> dict[str, float]:
    """{name: score of all rows} for the generation metrics; `rows` (from score_rows) saves scoring again."""
    out: dict[str, float] = {}
    for m in generation_metrics(metrics):
        given = [row[m.name] for row in rows] if rows and all(m.name in row for row in rows) else None
        out[m.name] = m.aggregate(predictions, references, given)
    return out


def _row_scores(metric: Metric, predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    if metric.row is None:
        raise _from_loss(metric)
    _check_lengths(predictions, references)
    scores = []
    for i, (prediction, reference) in enumerate(zip(predictions, references, strict=True)):
        try:
            value = metric.row(prediction, reference)
        except Exception as exc:  # the user's function: say which metric and which row, keep the cause for %tb
            raise NbtuneError(f"metric `{metric.name}` failed on row {i} {_row_text(prediction, reference)}: "
                              f"{type(exc).__name__}: {_first_line(exc)}", field="metric") from exc
        scores.append(_as_score(metric.name, value, i, prediction, reference))
    return scores


def _as_score(name: str, value: Any, i: int, prediction: str, reference: str) -> float:
    """A row's score as a finite float: bool counts as 0/1, numpy and 0-d tensor scalars as their value."""
    try:  # float("0.5") would pass a string off as a score
        score = math.nan if isinstance(value, (str, bytes)) else float(value)
    except (TypeError, ValueError):
        score = math.nan
    if not math.isfinite(score):
        raise NbtuneError(f"metric `{name}` returned {type(value).__name__} {_excerpt(value)} on row {i} "
                          f"{_row_text(prediction, reference)}; a score must be a finite number.", field="metric")
    return score


def paired_bootstrap(metric: Metric, predictions_a: Sequence[str], predictions_b: Sequence[str],
                     references: Sequence[str], *, resamples: int = 1000, confidence: float = 0.95,
                     seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap (Koehn 2004) of metric(a) - metric(b) on the same rows: `low`..`high` is the
    `confidence` percentile interval of the difference over `resamples` resamplings of the rows; an interval
    that excludes 0 is a difference the rows support. share_a_better / share_b_better: the fraction of
    resamples in which a (b) scores strictly higher."""
    import numpy as np  # only a comparison needs it

    _check_bootstrap(metric, predictions_a, predictions_b, references, resamples, confidence)
    score_a = _sample_scorer(metric, predictions_a, references)
    score_b = _sample_scorer(metric, predictions_b, references)
    n = len(references)
    a, b = (float(score(np.arange(n)[None, :])[0]) for score in (score_a, score_b))  # all rows, once each
    rng, parts = np.random.default_rng(seed), []
    chunk = max(1, 100_000 // n)  # resamples per index matrix: a few MB whatever the row count
    for start in range(0, resamples, chunk):  # the same samples for both systems: what makes the test paired
        samples = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        parts.append(score_a(samples) - score_b(samples))
    differences = np.concatenate(parts)
    low, high = np.percentile(differences, [50 * (1 - confidence), 50 * (1 + confidence)])  # equal tails
    return {"metric": metric.name, "a": a, "b": b, "difference": a - b, "low": float(low), "high": float(high),
            "confidence": confidence, "resamples": resamples, "rows": n,
            "share_a_better": float(np.mean(differences > 0)), "share_b_better": float(np.mean(differences < 0))}


def _sample_scorer(metric: Metric, predictions: Sequence[str], references: Sequence[str]) -> Callable[[Any], Any]:
    """A function of an index matrix (one resample of the rows per matrix row) to the scores of those samples."""
    import numpy as np

    if metric.corpus is None:  # a mean of rows: score each row once, then only index (vectorised)
        rows = np.asarray(_row_scores(metric, predictions, references))
        return lambda samples: rows[samples].mean(axis=1)
    if metric.corpus_stats is None:  # no sentence counts: score every sample from its text (slower)
        return lambda samples: np.array([metric.aggregate([predictions[i] for i in s], [references[i] for i in s])
                                         for s in samples])
    counts, score = metric.corpus_stats(predictions, references)
    table = np.asarray(counts)  # rows x counts; a sample's corpus score is the score of its summed counts
    return lambda samples: np.array([score(total) for total in table[samples].sum(axis=1)])


def _check_bootstrap(metric: Metric, predictions_a: Sequence[str], predictions_b: Sequence[str],
                     references: Sequence[str], resamples: int, confidence: float) -> None:
    _check_lengths(predictions_a, references, "predictions of a")  # (a loss metric: refused by _row_scores)
    _check_lengths(predictions_b, references, "predictions of b")
    if not references:
        raise NbtuneError("paired_bootstrap got no rows; it needs both runs' answers to the same eval rows.")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1 or not 0 < confidence < 1:
        raise NbtuneError(f"paired_bootstrap takes resamples=1 or more (e.g. 1000) and a confidence between 0 and "
                          f"1 (e.g. 0.95); got resamples={resamples!r}, confidence={confidence!r}.")


def _from_loss(metric: Metric) -> NbtuneError:
    return NbtuneError(f"metric `{metric.name}` comes from the Trainer's evaluation loss (run.metrics), with no "
                       f"score per answer; generated answers are scored by e.g. exact_match.", field="metric")


def _check_lengths(items: Sequence[Any], references: Sequence[Any], what: str = "predictions") -> None:
    if len(items) != len(references):
        raise NbtuneError(f"{len(items)} {what} for {len(references)} references; each row needs one of each.")


def _label(fn: Any) -> str:
    return f"`{_path_of(fn) or getattr(fn, '__qualname__', type(fn).__name__)}`"


def _excerpt(value: Any, limit: int = 40) -> str:
    text = str(value)  # a repr, one line whatever newlines the text holds
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _row_text(prediction: Any, reference: Any) -> str:
    return f"(prediction {_excerpt(prediction)}, reference {_excerpt(reference)})"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip() or "(no message)").splitlines()[0]
