"""Whether a difference between runs is real: which eval rows each run gets right, and a paired bootstrap
confidence interval of the metric difference between two runs (or a run and its base).

Both work on the rows the runs scored (`run.prediction_rows`), matched by prompt and reference, so runs
from this kernel and saved runs compare alike without generating again.

    >>> cmp = nbtune.compare("lora_r8", "lora_r32")                      # doctest: +SKIP
    >>> cmp.bootstrap()            # {'difference': 0.06, 'low': -0.02, 'high': 0.14, ...}  # doctest: +SKIP
    >>> cmp.agreement()            # per row: each run's score                               # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbtune.engine.evaluation.metrics import METRICS, Metric, paired_bootstrap
from nbtune.engine.evaluation.predictions import metric_columns, row_key
from nbtune.errors import NbtuneError, did_you_mean

if TYPE_CHECKING:
    from nbtune.engine.records.run import Run

BASE = "base"


def scored(runs: Sequence[Run]) -> list[Run]:
    """The runs that have scored rows."""
    return [r for r in runs if r.prediction_rows]


def common_rows(runs: Sequence[Run]) -> list[tuple[str, str]]:
    """The eval rows (prompt, reference) every run scored, in the first run's order."""
    keys = [row_key(r) for r in runs[0].prediction_rows]
    shared = set(keys)
    for run in runs[1:]:
        shared &= {row_key(r) for r in run.prediction_rows}
    return [k for k in keys if k in shared]


def primary_metric(runs: Sequence[Run], metric: str | None = None) -> str:
    """`metric` if every run scored it, else the first metric all of them scored."""
    columns = [metric_columns(r.prediction_rows) for r in runs]
    everyone = [c for c in columns[0] if all(c in other for other in columns[1:])]
    if metric is None:
        if not everyone:
            raise NbtuneError("these runs share no task metric: score them with one (`metric:` in their configs, "
                              "or run.evaluate()).", field="metric")
        return everyone[0]
    if metric not in everyone:
        raise NbtuneError(f"not every run scored `{metric}`.{did_you_mean(metric, everyone)} Metrics all of them "
                          f"scored: {', '.join(everyone) or 'none'}.", field="metric")
    return metric


# ---------------------------------------------------------------- which base each run is read against
def base_name_of(run: Run) -> tuple[str, str]:
    """(the model a run's base answers come from, its dtype): the config's model (a folder by its last part),
    or the model in memory it trained on ('p_sft (merged)'). Base answers are generated unquantized in the
    run's dtype, so a QLoRA run and a LoRA run of one model and dtype share a base."""
    from nbtune.engine.bases.loading import ALIASES
    from nbtune.engine.records import provenance

    recorded = (run.provenance or {}).get("model") or {}
    in_memory = (provenance.trained_in_memory(recorded, run.config.model) if recorded
                 else run.trained_on_a_base_in_memory)
    if in_memory:
        name = str(recorded.get("name") or run.base_name or "a model in memory")
    else:
        model = ALIASES.get(run.config.model, run.config.model)
        name = Path(model).name if Path(model).expanduser().is_dir() else model
    return name, str(run.config.dtype)


def base_labels(runs: Sequence[Run]) -> dict[str, str]:
    """Run name -> the label of its base ('base: SmolLM2-135M-Instruct'): one label per distinct base, with
    the dtype in it only where one model is a base in two dtypes. One name, one model."""
    keys = {run.name: base_name_of(run) for run in runs}
    dtypes: dict[str, set[str]] = {}
    for name, dtype in keys.values():
        dtypes.setdefault(name, set()).add(dtype)
    return {run: f"{BASE}: {name}, {dtype}" if len(dtypes[name]) > 1 else f"{BASE}: {name}"
            for run, (name, dtype) in keys.items()}


def base_groups(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Label -> the runs read against that base, in first-seen order."""
    labels = base_labels(runs)
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(labels[run.name], []).append(run)
    return groups


def base_columns(runs: Sequence[Run]) -> list[str]:
    """The agreement table's base columns: `base` when every run shares one base, else one per base label."""
    groups = base_groups(scored(runs))
    return [BASE] if len(groups) <= 1 else list(groups)


def agreement(runs: Sequence[Run], metric: str | None = None) -> list[dict[str, Any]]:
    """Per shared eval row: the prompt, the reference, and the base's and each run's score on `metric` (a
    column `base`, or one per base when the runs have several: see `base_columns`)."""
    runs = _with_rows(runs, at_least=1)
    name = primary_metric(runs, metric)
    keys = common_rows(runs)
    by_run = {run.name: {row_key(r): r for r in run.prediction_rows} for run in runs}
    groups = base_groups(runs)
    columns = [BASE] if len(groups) == 1 else list(groups)
    out = []
    for i, key in enumerate(keys):
        row = {"row": i, "prompt": key[0], "reference": key[1]}
        row.update({column: by_run[members[0].name][key].get(f"base_{name}")
                    for column, members in zip(columns, groups.values(), strict=True)})
        row.update({run.name: by_run[run.name][key].get(name) for run in runs})
        out.append(row)
    return out


def agreement_counts(rows: Sequence[dict[str, Any]], names: Sequence[str], best: float = 1.0) -> dict[str, int]:
    """How many rows every run gets right, none does, only one run does, and the base does."""
    def right(value: Any) -> bool:
        return isinstance(value, (int, float)) and value >= best - 1e-9

    counts = {"rows": len(rows), "all right": 0, "none right": 0}
    for row in rows:
        hits = [n for n in names if right(row.get(n))]
        counts["all right"] += len(hits) == len(names)
        counts["none right"] += not hits
        if len(hits) == 1 and len(names) > 1:
            counts[f"only {hits[0]} right"] = counts.get(f"only {hits[0]} right", 0) + 1
    for column in [c for c in (rows[0] if rows else {}) if c == BASE or c.startswith(f"{BASE}: ")]:
        if any(row.get(column) is not None for row in rows):
            counts[f"{column} right"] = sum(right(row.get(column)) for row in rows)
    return counts


def bootstrap(runs: Sequence[Run], a: str | None = None, b: str | None = None, *, metric: str | None = None,
              resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap of metric(a) - metric(b) over the rows both scored. `a`, `b`: run names (default the
    two runs compared); `b="base"` sets a run against its base model's answers."""
    runs = _with_rows(runs, at_least=1)
    first, second, base_label = _pair(runs, a, b)
    pair = [first] if second is None else [first, second]
    name = primary_metric(pair, metric)
    keys = common_rows(pair)
    if not keys:
        raise NbtuneError(f"runs {first.name!r} and {second.name!r} scored no eval row in common: evaluate them on "
                          "the same eval data.")
    rows_a = {row_key(r): r for r in first.prediction_rows}
    rows_b = {row_key(r): r for r in second.prediction_rows} if second is not None else rows_a
    answer_b = "tuned" if base_label is None else BASE  # a base's answers ride on the rows of a run on that base
    predictions_a = [rows_a[k]["tuned"] for k in keys]
    predictions_b = [rows_b[k][answer_b] for k in keys]
    if any(p is None for p in predictions_b):
        raise NbtuneError(f"run {(second or first).name!r} has no base answers to compare with (its base was "
                          "passed in memory).")
    references = [k[1] for k in keys]
    found = paired_bootstrap(_metric(name, [rows_a, rows_b]), predictions_a, predictions_b,
                             references, resamples=resamples, confidence=confidence, seed=seed)
    return {"a": first.name, "b": base_label or second.name, **{k: v for k, v in found.items() if k not in ("a", "b")},
            "score_a": found.get("a"), "score_b": found.get("b")}


def describe(result: dict[str, Any]) -> str:
    """'lora_r32 - lora_r8 on exact_match: +0.062 [-0.016, +0.141] (95% interval, 1000 paired resamples of
    64 rows); lora_r32 higher in 93% of them.'"""
    level = f"{result['confidence']:.0%}"
    verdict = ("a real difference at this level" if result["low"] > 0 or result["high"] < 0
               else "not distinguishable from noise at this level")
    return (f"{result['a']} - {result['b']} on {result['metric']}: {result['difference']:+.3g} "
            f"[{result['low']:+.3g}, {result['high']:+.3g}] ({level} interval, {result['resamples']} paired resamples "
            f"of {result['rows']} rows; {result['a']} higher in {result['share_a_better']:.0%} of them): {verdict}.")


def _with_rows(runs: Sequence[Run], *, at_least: int) -> list[Run]:
    found = scored(runs)
    if len(found) < at_least:
        raise NbtuneError("no run here has scored eval rows: give them a task metric (`metric: exact_match`, "
                          "token_f1, ...) or call run.evaluate().", field="metric")
    return found


def _pair(runs: list[Run], a: str | None, b: str | None) -> tuple[Run, Run | None, str | None]:
    """(run a, the run whose rows give b's answers, b's base label when b is a base). `b` is a run, a base's
    label as the table shows it, or "base": the base, when the runs compared have one."""
    named = {r.name: r for r in runs}
    groups = base_groups(runs)

    def pick(name: str) -> Run:
        if name not in named:
            raise NbtuneError(f"no run {name!r} with scored rows in this comparison.{did_you_mean(name, list(named))}"
                              f" Runs with rows: {', '.join(named)}.")
        return named[name]

    if a is None and b is None:
        if len(runs) == 1:
            return runs[0], runs[0], _label_of(runs[0], groups)  # one run: against its base
        if len(runs) != 2:
            raise NbtuneError(f"bootstrap compares two runs; this comparison has {len(runs)} with scored rows: name "
                              f"them, e.g. cmp.bootstrap({runs[0].name!r}, {runs[1].name!r}).")
        return runs[0], runs[1], None
    first = pick(a) if a is not None else next(r for r in runs if r.name != b)
    if b == BASE:
        if len(groups) > 1:
            choices = "; ".join(f"{label!r} (of {', '.join(r.name for r in members)})"
                                for label, members in groups.items())
            raise NbtuneError(f"'base' means {len(groups)} models in this comparison: {choices}. Name one, e.g. "
                              f"cmp.bootstrap({first.name!r}, {_label_of(first, groups)!r}).")
        return first, first, _label_of(first, groups)
    if b in groups:
        return first, groups[b][0], b
    second = pick(b) if b is not None else next((r for r in runs if r is not first), None)
    return first, second, None


def _label_of(run: Run, groups: dict[str, list[Run]]) -> str:
    return next(label for label, members in groups.items() if run in members)


def _metric(name: str, rows: list[dict[tuple[str, str], dict[str, Any]]]) -> Metric:
    """The registry's metric, or for a function of another kernel a mean of the row scores it left."""
    if name in METRICS:
        return METRICS[name]
    scores: dict[tuple[str, str], float] = {}
    for table in rows:
        for (_prompt, reference), row in table.items():
            scores[(row["tuned"], reference)] = row[name]
            if row.get("base") is not None and f"base_{name}" in row:
                scores[(row["base"], reference)] = row[f"base_{name}"]
    return Metric(name=name, row=lambda prediction, reference: scores[(prediction, reference)])
