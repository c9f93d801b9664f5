"""Comparing runs that share one base model: a table, a config diff, curves and side-by-side answers.

The data lives here; `nbtune.widgets.compare_view` renders it (static HTML that survives saving).

    >>> cmp = nbtune.compare("lora_r8", "ia3", "prefix")     # doctest: +SKIP
    >>> cmp                                                   # a static HTML table + overlaid curves
    >>> cmp.generations(["Convert this date ...: 3 Aug 1987"])  # doctest: +SKIP

The base model's answers come from the same loaded weights with every adapter switched off.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from nbtune.engine.evaluation.generation import generate_texts
from nbtune.engine.evaluation.significance import base_groups
from nbtune.engine.records.history import SavedRun, saved_mb, saved_record, with_model
from nbtune.engine.records.run import Run
from nbtune.errors import NbtuneError
from nbtune.objectives.registry import report_columns

TABLE_KEYS = ("trainable_params", "trainable_percent", "adapter_mb", "train_seconds", "tokens_per_second",
              "peak_rss_mb", "train_loss", "eval_loss")
_NOT_CONFIG = {"name", "output_dir", "derived"}



class Comparison:
    """Several runs side by side; renders as static HTML (survives saving the notebook)."""

    def __init__(self, runs: Sequence[Run], *, every_run: bool = False) -> None:
        if not runs:
            raise NbtuneError("compare needs at least one run (a Run or a name in nbtune.runs).")
        self.runs = list(runs)
        # `nbtune.compare()` with no names takes every run in the kernel, failed and reclaimed ones too:
        # they stay in the table, and answers come from the runs that still hold a model.
        self.every_run = every_run

    # ------------------------------------------------------------------ data
    def table(self) -> list[dict[str, Any]]:
        """One row per run: method, size, speed, memory, losses and every task metric; first, when the runs
        were scored, a row per base model they were read against, named after it ('base: SmolLM2-135M-
        Instruct', 'base: p_sft (merged)'): its metrics on the same rows."""
        metrics = self.metric_names()
        # the columns the runs' objectives declare (a preference run's held-out numbers), where any run has them
        declared = report_columns(getattr(r.config, "objective", None) for r in self.runs)
        preference = [k for k in declared if any(r.metrics.get(k) is not None for r in self.runs)]
        rows = [{"run": r.name, "method": r.method.name, "status": r.status,
                 **{k: (adapter_mb(r) if k == "adapter_mb" else r.metrics.get(k)) for k in TABLE_KEYS},
                 **{k: r.metrics.get(k) for k in [*preference, *metrics]}} for r in self.runs]
        # One row per base the runs were scored against, named after it: runs on a merged SFT model and runs
        # on the raw model are read against different references.
        scored = [r for r in self.runs if any(r.metrics.get(f"base_{k}") is not None for k in metrics)]
        bases = [{"run": label, "method": "-", "status": "-", **dict.fromkeys([*TABLE_KEYS, *preference]),
                  **{k: members[0].metrics.get(f"base_{k}") for k in metrics}}
                 for label, members in base_groups(scored).items()]
        return [*bases, *rows]

    def metric_names(self) -> list[str]:
        """The task metrics any run was scored with, in first-seen order (the table's last columns)."""
        from nbtune.engine.evaluation.metrics import METRICS
        from nbtune.engine.evaluation.predictions import metric_columns

        names: list[str] = []
        for run in self.runs:
            found = metric_columns(run.prediction_rows) or [k for k in METRICS if run.metrics.get(k) is not None
                                                          and k != "eval_loss"]
            names += [n for n in found if n not in names]
        return names

    def agreement(self, metric: str | None = None) -> list[dict[str, Any]]:
        """Per eval row all the runs scored: prompt, reference, and the base's and each run's score on
        `metric` (default: the first metric they share): which rows each run gets right."""
        from nbtune.engine.evaluation.significance import agreement

        return agreement(self.runs, metric)

    def bootstrap(self, a: str | None = None, b: str | None = None, *, metric: str | None = None,
                  resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
        """Paired bootstrap interval of metric(a) - metric(b) over the rows both scored: is the difference
        real? Default: the two runs compared (or one run against its base). `b` is a run, a base row's name as
        the table shows it, or "base" (refused, naming the choices, when the runs have several bases)."""
        from nbtune.engine.evaluation.significance import bootstrap

        return bootstrap(self.runs, a, b, metric=metric, resamples=resamples, confidence=confidence, seed=seed)

    def config_diff(self) -> dict[str, dict[str, Any]]:
        """Only the config keys whose values differ between the runs: key -> {run: value}."""
        configs = {r.name: {k: v for k, v in r.config.to_json_dict().items() if k not in _NOT_CONFIG}
                   for r in self.runs}
        keys = sorted({k for c in configs.values() for k in c})
        diff = {}
        for key in keys:
            values = {name: config.get(key, "-") for name, config in configs.items()}
            if len({repr(v) for v in values.values()}) > 1:
                diff[key] = values
        return diff

    def curves(self) -> dict[str, dict[str, list[float]]]:
        """run -> {step, elapsed_seconds, loss} lists, for overlaying by step or by wall time."""
        out = {}
        for r in self.runs:
            rows = [h for h in r.history if "loss" in h]
            out[r.name] = {"step": [h["step"] for h in rows], "elapsed_seconds": [h["elapsed_seconds"] for h in rows],
                           "loss": [h["loss"] for h in rows]}
        return out

    def generations(self, prompts: Iterable[Any], *, max_new_tokens: int = 32) -> list[dict[str, str]]:
        """For each prompt: the base model's answer and every run's answer (greedy).

        Plain-LoRA runs on one base answer together in one mixed batch (peft `adapter_names`), with
        the base rows in the same batch; other runs answer one after another.
        """
        from nbtune.engine.evaluation.adapters import is_plain_lora, lora_stack, mixed_generate

        prompts = list(prompts)
        answering = [r for r in self.runs if r.model is not None] if self.every_run else self.runs
        if not answering:
            raise NbtuneError("no run in this comparison holds a model (failed or reclaimed runs); "
                              "train or load one (nbtune.load_run) first.")
        for run in answering:
            with_model(run).require_model()  # a saved run is loaded onto the cached base now
        loras = [r for r in answering if is_plain_lora(r)]
        columns: dict[str, list[str]] = {}
        if len(loras) > 1:
            stack = lora_stack(loras)
            columns.update(mixed_generate(stack, loras[0].tokenizer, prompts, [r.name for r in loras],
                                          max_new_tokens=max_new_tokens))
        else:
            loras = []
            base = base_answers(answering, prompts, max_new_tokens=max_new_tokens)
            if base is not None:
                columns["base"] = base
        for r in answering:
            if r not in loras:
                columns[r.name] = generate_texts(r.model, r.tokenizer, prompts, max_new_tokens=max_new_tokens)
        order = [*(["base"] if "base" in columns else []), *(r.name for r in answering)]
        return [{"prompt": p if isinstance(p, str) else p[-1]["content"], **{n: columns[n][i] for n in order}}
                for i, p in enumerate(prompts)]

    @property
    def df(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.table()).set_index("run")


def base_answers(runs: Sequence[Run], prompts: list[Any], *, max_new_tokens: int) -> list[str] | None:
    """The unmodified base model's answers (engine/evaluation/scoring.py), from the first run that can give them."""
    from nbtune.engine.evaluation.scoring import base_answers as answers_of_base

    chosen = next((r for r in runs if r.method.keeps_base(r.config.options) and not r.context.quantized), runs[0])
    return answers_of_base(chosen, prompts, max_new_tokens=max_new_tokens)


def adapter_mb(run: Run) -> float | None:
    """Size on disk of what the run saved (adapter or weights), without tokenizer and run.json."""
    return saved_mb(Path(run.saved_to)) if run.saved_to is not None else None


def resolve_runs(items: Sequence[Any], runs: dict[str, Run], *, saved: bool = False) -> list[Run]:
    """Runs from Run objects or names in `runs`; an unknown name lists the known ones. `saved=True` also
    takes saved runs: a folder `Run.save` wrote, a row of `nbtune.history()`, or the name of a run saved
    where it saves by default (`runs/<name>`: a sweep's trials, `sweep/3`, after the kernel let them go);
    records whose model loads when answers are asked for."""
    out = []
    for item in items:
        if isinstance(item, Run):
            out.append(item)
        elif isinstance(item, str) and item in runs:
            out.append(runs[item])
        elif saved and (isinstance(item, SavedRun) or Path(str(item)).expanduser().joinpath("run.json").is_file()):
            out.append(_labelled(saved_record(item), out, runs))
        elif saved and isinstance(item, str) and (folder := _saved_by_name(item)) is not None:
            out.append(_labelled(saved_record(folder), out, runs))
        else:
            also = " (or a saved run's folder or name under runs/)" if saved else ""
            raise NbtuneError(f"no run {item!r} in nbtune.runs{also}; runs in this kernel: "
                              f"{', '.join(runs) or 'none'}.")
    return out


def _saved_by_name(name: str) -> Path | None:
    """`runs/<name>` when a run of that name was saved there (its default place); only a valid run name is
    looked up, so that no name reaches outside runs/."""
    import re

    from nbtune.config import RUN_PATH

    folder = Path("runs") / name
    return folder if re.fullmatch(RUN_PATH, name) and (folder / "run.json").is_file() else None


def _labelled(record: Run, chosen: list[Run], runs: dict[str, Run]) -> Run:
    """A saved run named like a run of this kernel (or another one compared) says it is the saved one: the
    comparison's rows, curves and columns are by name. The folder is shown as deep as the name goes (a
    trial's `sweep/3`, not `3`)."""
    taken = set(runs) | {r.name for r in chosen}
    label, again = record.name, 1
    folder = "/".join(Path(record.saved_to).parts[-(record.name.count("/") + 1):])
    while label in taken:
        again += 1
        label = f"{record.name} (saved {folder}{f', {again - 1}' if again > 2 else ''})"
    record.name = label
    return record
