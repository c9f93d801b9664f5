"""`nbtune.load(path)`: a saved run back in memory, on a freshly loaded base, ready to generate or compare.

    >>> run = nbtune.load("runs/demo")          # doctest: +SKIP
    >>> run.generate("Convert this date to ISO format (YYYY-MM-DD): 1 May 2000")  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nbtune.config import RunConfig
from nbtune.data import prepare_tokenizer, prompts_and_answers
from nbtune.engine.bases.loading import Base, as_base, load_base
from nbtune.engine.records import provenance, run_folder
from nbtune.engine.records.run import Run
from nbtune.engine.training.quiet import no_hf_progress_bars
from nbtune.errors import DataError, NbtuneError, NbtuneWarning
from nbtune.methods import get_method
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
    info = run_folder.read_record(path)  # checked, and upgraded from the schema it was written in
    config = run_folder.config_of(info, quantization=quantization)
    method = get_method(config.method)
    recorded = info["provenance"].get("model") or {}
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
    run = Run.from_dict(info, folder=path, config=config, tokenizer=tokenizer)  # as history() rebuilds one
    run.model, run.tokenizer = model, tokenizer
    run.base_name = base.name  # the base it is on now (the recorded one, or one given)
    data = _records(config)
    run.eval_pairs = _eval_pairs(data)
    # The base's weights are checked where nbtune knows its folder (a (model, tokenizer) given has none).
    _warn_of_changes(info, config, model_folder=base.path,
                     data=data if provenance.data_recheckable(config) else None)
    return run


def saved_base(path: Path, info: dict[str, Any], config: RunConfig, *,
               view_for: Callable[[RunConfig], Base] | None = None) -> Base:
    """The base the saved run in `path` trained on: `config.model` (a view of the kernel's cached base with
    `view_for`, else loaded), or the in-memory model it trained on, rebuilt or refused (see `load`)."""
    recorded = info["provenance"].get("model") or {}
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
        raise NbtuneError(f"run {info['name']!r} trained on {what}, which nbtune cannot rebuild; "
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
        if folder is not None and run_folder.holds_run(folder, origin.get("id")):
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
    metrics and adapter then describe something else. Nothing to compare in a run.json without provenance (a
    schema-1 file from before it: its provenance is {})."""
    for change in provenance.changes(info["provenance"], **now):
        warnings.warn(f"run {config.name!r}: {change}.", NbtuneWarning, stacklevel=3)
