"""`nbtune.load(path)`: a saved run back in memory, on a freshly loaded base, ready to generate or compare.

    >>> run = nbtune.load("runs/demo")          # doctest: +SKIP
    >>> run.generate("Convert this date to ISO format (YYYY-MM-DD): 1 May 2000")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nbtune.config import RunConfig
from nbtune.data import prepare_tokenizer, prompts_and_answers
from nbtune.engine.bases.loading import Base, as_base, load_base
from nbtune.engine.evaluation.predictions import read_rows
from nbtune.engine.records import provenance
from nbtune.engine.records.run import History, Run
from nbtune.engine.training.quiet import no_hf_progress_bars
from nbtune.errors import DataError, NbtuneError, NbtuneWarning
from nbtune.methods import MethodContext, get_method
from nbtune.safety import check_loadable_folder


def load(path: str | Path, *, base: Base | tuple[Any, Any] | None = None, quantization: str | None = None,
         view_for: Callable[[RunConfig], Base] | None = None) -> Run:
    """Re-open a folder written by `Run.save`: config, metrics and history from run.json, and the model.

    `base` is an already loaded (model, tokenizer) to put the result on; otherwise the run's own base
    model is loaded (`quantization` overrides how, e.g. 'none' to merge a QLoRA adapter in full precision).
    A run that trained on a model passed in memory is put on that model again: rebuilt when it was another
    saved run merged (`run.merge()`; that run's folder is found where it was saved, or beside this one),
    else refused with how to pass it (`base=`). An `NbtuneWarning` names the data or base weights that differ
    from those run.json's provenance recorded. `view_for(config)` gives the base instead of loading one (the
    kernel's cached base).
    """
    path = Path(path)
    info = _read_run_json(path)
    config = saved_config(info, quantization)
    method = get_method(config.method)
    recorded = (info.get("provenance") or {}).get("model") or {}
    if base is None:
        base = saved_base(path, info, config, view_for=view_for)
    else:
        base = as_base(base)
        _warn_if_another_model(config, recorded, base)
    from transformers import AutoTokenizer

    check_loadable_folder(path, what="saved run")
    with no_hf_progress_bars():
        try:
            tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(path))  # carries the chat template used
        except (OSError, ValueError) as exc:
            raise NbtuneError(f"{str(path)!r} has no usable tokenizer ({str(exc).splitlines()[0][:160]}): "
                              "it is not a complete folder written by Run.save.") from None
        try:
            model = method.load_trained(base.model, path)
        except RuntimeError as exc:  # torch's "size mismatch for ..." over many lines: a different base
            if "size mismatch" not in str(exc):
                raise
            raise NbtuneError(f"the run in {str(path)!r} was trained on another base model than the one given "
                              f"(its weights do not fit: {str(exc).splitlines()[1].strip()[:160]}); it was "
                              f"trained on {config.model!r}.") from None
    ctx = MethodContext(options=config.options, config=config, workdir=Path(tempfile.mkdtemp(prefix="nbtune-")),
                        quantized=config.quantization != "none", tokenizer=tokenizer)
    run = Run(config, method, ctx, status=info["status"])
    run.metrics = dict(info.get("metrics") or {})
    run.id = info.get("id", run.id)  # the same run as the one saved: the folder holds it
    run.history = History(info.get("history") or [])
    run.eval_history = list(info.get("eval_history") or [])
    run.samples = list(info.get("samples") or [])
    run.prediction_rows = read_rows(path)  # the rows scored when it trained: shown without generating again
    run.provenance = dict(info.get("provenance") or {})  # run.json files from before it have none
    run.model, run.tokenizer, run.saved_to = model, tokenizer, path
    run.base_name = base.name
    run.total_steps = run.metrics.get("steps", 0)
    data = _records(config)
    run.eval_pairs = _eval_pairs(data)
    # The base's weights are checked where nbtune knows its folder (a (model, tokenizer) given has none).
    _warn_of_changes(info, config, model_folder=base.path,
                     data=data if provenance.data_recheckable(config) else None)
    return run


def saved_config(info: dict[str, Any], quantization: str | None = None) -> RunConfig:
    """The config a saved run's run.json holds, parsed as this version reads it."""
    given = dict(info["config"])
    given.pop("output_dir", None)  # where it was saved is the folder; a save from here goes to runs/<name>
    given["metric"] = openable_metric(given.get("metric", "auto"))
    if quantization is not None:
        given["quantization"] = quantization
    return RunConfig.parse(given)


def saved_base(path: Path, info: dict[str, Any], config: RunConfig, *,
               view_for: Callable[[RunConfig], Base] | None = None) -> Base:
    """The base the saved run in `path` trained on: `config.model` (a view of the kernel's cached base with
    `view_for`, else loaded), or the in-memory model it trained on, rebuilt or refused (see `load`)."""
    recorded = (info.get("provenance") or {}).get("model") or {}
    if not provenance.trained_in_memory(recorded, config.model):
        if view_for is not None:
            return view_for(config)
        return load_base(config.model, quantization=config.quantization, dtype=config.dtype,
                         trust_remote_code=config.trust_remote_code)
    parent = _merged_from_folder(path, recorded.get("merged_from"))
    if parent is None:
        origin = recorded.get("merged_from") or {}
        what = (f"run {origin['run']!r} merged (run.merge()), whose saved folder is not where it was nor beside "
                f"this one" if origin.get("run") else f"{recorded.get('name') or 'a model'} passed in memory")
        example = (f"(nbtune.load_run({str(Path(path).parent / origin['run'])!r}).merge(), tokenizer)"
                   if origin.get("run") else "(model, tokenizer)")
        raise NbtuneError(f"run {info.get('name', path.name)!r} trained on {what}, which nbtune cannot rebuild; "
                          f"pass that model as its base: nbtune.load_run({str(path)!r}, base={example}).",
                          field="base")
    source = load(parent, view_for=view_for)  # its own base found the same way: a chain of merges rebuilds
    rebuilt = as_base((source.merge(), source.tokenizer))
    _warn_if_another_model(config, recorded, rebuilt)
    return rebuilt


def _merged_from_folder(path: Path, origin: dict[str, Any] | None) -> Path | None:
    """The folder of the run a base was merged from: where it was saved then, or beside this run, if it still
    holds that very run (its id)."""
    if not isinstance(origin, dict) or not origin.get("run"):
        return None
    for folder in (origin.get("saved_to"), Path(path).parent / str(origin["run"])):
        if folder is None:
            continue
        try:
            saved = json.loads((Path(folder) / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(saved, dict) and saved.get("id") == origin.get("id"):
            return Path(folder)
    return None


def _warn_if_another_model(config: RunConfig, recorded: dict[str, Any], base: Base) -> None:
    """The base given (or rebuilt) is checked against the fingerprint recorded of the in-memory model the run
    trained on: an adapter on other weights answers something else."""
    then = recorded.get("fingerprint")
    if then and provenance.weights_sample_fingerprint(base.model) != then:
        warnings.warn(f"run {config.name!r}: the base it is put on ({base.name}) is not the model it trained on "
                      "(their weights' fingerprints differ); its answers and metrics may not match the saved ones.",
                      NbtuneWarning, stacklevel=3)


def openable_metric(spec: Any) -> Any:
    """A saved run's `metric` with the 'module:function' paths that no longer import left out: the scores they
    gave are in its metrics and predictions; the run must open wherever that module is missing."""
    from nbtune.engine.evaluation.metrics import check_metric_spec
    from nbtune.errors import ConfigError

    try:
        return check_metric_spec(spec)
    except ConfigError:
        kept = []
        for item in spec if isinstance(spec, list) else [spec]:
            try:
                kept += check_metric_spec(item) if item not in ("auto", "none") else []
            except ConfigError:
                continue
        return kept or "none"


def _read_run_json(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise NbtuneError(f"{str(path)!r} is not a folder: give the folder Run.save wrote (e.g. runs/NAME).")
    try:
        info = json.loads((path / "run.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NbtuneError(f"{str(path)!r} has no run.json: it is not a folder written by Run.save.") from None
    except ValueError as exc:
        raise NbtuneError(f"{str(path)!r}: run.json is damaged ({exc}).") from None
    if not isinstance(info, dict) or not isinstance(info.get("config"), dict) or "status" not in info:
        raise NbtuneError(f"{str(path)!r}: run.json is not one Run.save wrote (no config and status).")
    return info


def _records(config: RunConfig) -> tuple[Any, Any, str] | None:
    """The run's data read again from its config: (train, eval, format); None for in-memory data, which is
    not saved with the run."""
    from nbtune.data.splits import read_data

    try:
        return read_data(config)
    except DataError:
        return None


def _eval_pairs(data: tuple[Any, Any, str] | None) -> list[tuple[list[dict[str, str]], str]]:
    if data is None:  # evaluation then needs eval data again
        return []
    _, evaluation, fmt = data
    return prompts_and_answers(evaluation, fmt) if evaluation is not None and fmt != "text" else []


def _warn_of_changes(info: dict[str, Any], config: RunConfig, **now: Any) -> None:
    """A warning for each recorded item (data, base weights) that differs from what trained the run: its
    metrics and adapter then describe something else. Nothing to compare in a run.json without provenance."""
    for change in provenance.changes(info.get("provenance") or {}, **now):
        warnings.warn(f"run {config.name!r}: {change}.", NbtuneWarning, stacklevel=3)
