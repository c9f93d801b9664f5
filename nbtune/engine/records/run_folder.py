"""A run's folder and its `run.json`: the one module that writes, reads, checks and upgrades them.

A saved run is a folder: the adapter or weights and the tokenizer (written by the method), `run.json` (the
record, written here), `predictions.jsonl` beside it (the scored eval rows, engine/evaluation/predictions.py),
and, when it checkpoints periodically, a sibling `<folder>-checkpoints/checkpoint-N` for each checkpoint,
each holding the run's `run.json` as it stood then.

run.json, schema 2 (the version is in the file: `"schema": 2`; a file without it is schema 1, as the releases
before it wrote, and is upgraded as it is read):

    schema          2
    nbtune_version  the nbtune that wrote it
    id              which run: a newer run saved over the folder under the same name has another (null: a
                    schema-1 file from before runs had ids)
    name            the run's name (`<sweep>/<trial>` for a sweep's trial)
    status          pending, running, finished, stopped, pruned, failed or combined (STATUSES)
    method          the method's registered name
    save_format     what the method saved (methods/registry.py SAVE_FORMATS)
    error           why a failed run failed, else null
    config          RunConfig.to_json_dict(): settings and method options flat, `derived`; data passed in
                    memory as its description ("<list>"), `metric` functions by import path
    metrics         final metrics (train_loss, eval_loss, exact_match, steps, ...)
    history         one dict per optimizer step (step, loss, lr, grad_norm, tokens_per_second, ...)
    eval_history    one dict per evaluation during training
    samples         the live answers to `sample_prompts` ({"step", "prompt", "answer"})
    provenance      what repeating it takes (engine/records/provenance.py)
    total_steps     the optimizer steps it was to take (its history says how far it got)
    base_name       the base it trained on ("p_sft (merged)" for a model passed in memory)
    saved_to        the folder it was written to; a folder read back is where it is now

Reading (`read_record`) refuses a damaged or foreign file with one `RecordError` (whose `why` is the short
reason `nbtune.history()` shows in its row) and upgrades older schemas (`migrate`). `Run.to_dict` and
`Run.from_dict` (records/run.py) are `record_of` and `restore` here; this module sits below records/run.py and
never imports it.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbtune.config import RunConfig
from nbtune.engine.evaluation.predictions import FILE as PREDICTIONS
from nbtune.engine.evaluation.predictions import read_rows, write_rows
from nbtune.engine.records.saving import write_json
from nbtune.errors import ConfigError, NbtuneError
from nbtune.methods import MethodContext, get_method

if TYPE_CHECKING:
    from nbtune.engine.records.run import Run
    from nbtune.methods.registry import MethodSpec

RECORD = "run.json"
SCHEMA = 2
CHECKPOINTS_SUFFIX = "-checkpoints"  # `<output_dir>-checkpoints`: beside the folder, which a save replaces whole
CHECKPOINT_PREFIX = "checkpoint-"  # the Trainer's own name for `checkpoint-<step>`
CHECKPOINT_MANIFEST = "nbtune-checkpoint.json"  # written last (training/checkpoints.py): a checkpoint is complete
# "pruned": a sweep trial its pruner ended early (engine/experiments/sweep.py); unlike "stopped", nothing to resume.
STATUSES = ("pending", "running", "finished", "stopped", "pruned", "failed", "combined")
# Schema 1 wrote these run settings into every config, even an sft run's, at these values; they are the
# preference objectives' own keys now, and a config keeps them only where it set them.
_V1_OBJECTIVE_DEFAULTS = (("beta", None), ("loss_type", None), ("precompute_ref", False))
_V1_SWEEP_METRIC, SWEEP_METRIC = "objective", "optimize"  # the `sweep:` block's metric to optimise, then and now
# Each field after migration: the types it may hold (checked, so that a hand-edited or foreign file is one
# clear error here rather than a KeyError somewhere that reads it).
_FIELDS: dict[str, tuple[type, ...]] = {
    "nbtune_version": (str, type(None)), "id": (str, type(None)), "name": (str,), "status": (str,),
    "method": (str,), "save_format": (str, type(None)), "error": (str, type(None)), "config": (dict,),
    "metrics": (dict,), "history": (list,), "eval_history": (list,), "samples": (list,), "provenance": (dict,),
    "total_steps": (int,), "base_name": (str, type(None)), "saved_to": (str, type(None)),
}


class RecordError(NbtuneError):
    """A run.json that cannot be read as a run's record; `why` is the reason alone, for a table's cell."""

    def __init__(self, message: str, why: str) -> None:
        super().__init__(message)
        self.why = why


# ---------------------------------------------------------------- names in and beside a run folder
def record_file(folder: str | Path) -> Path:
    return Path(folder) / RECORD


def is_run_folder(folder: str | Path) -> bool:
    """Whether `folder` holds a run's record (what `Run.save` writes last)."""
    return record_file(folder).is_file()


def checkpoints_folder(output: str | Path) -> Path:
    """Where a run saved to `output` keeps its periodic checkpoints."""
    out = Path(output)
    return out.with_name(out.name + CHECKPOINTS_SUFFIX)


def checkpoint_step(folder: Path) -> int | None:
    """N of a `checkpoint-N` folder; None for any other name."""
    suffix = folder.name.removeprefix(CHECKPOINT_PREFIX)
    return int(suffix) if folder.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def newest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint (its manifest written) under a checkpoints folder, unverified."""
    complete = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*")
                if checkpoint_step(p) is not None and (p / CHECKPOINT_MANIFEST).is_file()]
    return max(complete, key=lambda p: checkpoint_step(p) or 0) if complete else None


# ---------------------------------------------------------------- writing
def record_of(run: Run, *, saved_to: str | Path | None = None) -> dict[str, Any]:
    """What run.json holds for `run` (see the module's docstring); `saved_to`: the folder it is being written
    to, when that is not yet `run.saved_to`."""
    where = saved_to if saved_to is not None else run.saved_to
    return {
        "schema": SCHEMA,
        # From the package as loaded: importing `nbtune` here would tie this module to all of it (its
        # __init__ imports the api), in a circle of imports.
        "nbtune_version": getattr(sys.modules.get("nbtune"), "__version__", None),
        "id": run.id,
        "name": run.name,
        "status": run.status,
        "method": run.method.name,
        "save_format": run.method.save_format(run.config.options),
        "error": run.error,
        "config": run.config.to_json_dict(),
        "metrics": run.metrics,
        "history": list(run.history),
        "eval_history": run.eval_history,
        "samples": run.samples,
        "provenance": run.provenance,
        "total_steps": run.total_steps,
        "base_name": run.base_name,
        "saved_to": str(where) if where is not None else None,
    }


def write_record(folder: str | Path, record: dict[str, Any]) -> None:
    """run.json in `folder` (inside a save's or checkpoint's staging folder: those make it atomic)."""
    write_json(record_file(folder), record)


def write_run(folder: Path, run: Run, *, saved_to: Path) -> None:
    """The record and its sibling files into `folder` (a save's staging folder, renamed to `saved_to`)."""
    if run.prediction_rows:
        write_rows(folder, run.prediction_rows)
    write_record(folder, record_of(run, saved_to=saved_to))


def rewrite_status(folder: str | Path, status: str) -> None:
    """Change the status a saved run.json records (a sweep's trial its pruner ended), atomically: a reader
    sees the old file or the new one. The file is written back in the current schema."""
    record = read_record(folder)
    record["status"] = _known_status(status)
    target = record_file(folder)
    partial = target.with_name(f".{RECORD}.partial")
    write_json(partial, record)
    os.replace(partial, target)


# ---------------------------------------------------------------- reading
def read_record(folder: str | Path) -> dict[str, Any]:
    """The record in `folder`'s run.json, checked and upgraded to the current schema; a `RecordError` names
    the folder and what is wrong."""
    path = Path(folder)
    shown = str(path)
    if not path.is_dir():
        raise RecordError(f"{shown!r} is not a folder: give the folder Run.save wrote (e.g. runs/NAME).",
                          "not a folder")
    try:
        data = json.loads(record_file(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecordError(f"{shown!r} has no run.json: it is not a folder written by Run.save.",
                          "no run.json") from None
    except (OSError, ValueError) as exc:
        why = f"run.json unreadable: {str(exc).splitlines()[0][:80]}"
        raise RecordError(f"{shown!r}: run.json is damaged ({why}).", why) from None
    try:
        return checked(data)
    except RecordError as exc:
        raise RecordError(f"{shown!r}: {exc}", exc.why) from None


def try_read_record(folder: str | Path) -> dict[str, Any] | None:
    """`read_record`, or None where there is no readable record (a folder nbtune did not write)."""
    try:
        return read_record(folder)
    except RecordError:
        return None


def checked(data: Any) -> dict[str, Any]:
    """`data` (a parsed run.json, or `Run.to_dict()`'s dict) as a current record: upgraded from its schema,
    each field of the right type. A `RecordError` says what is wrong."""
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict) or "status" not in data:
        raise RecordError("run.json is not one Run.save wrote (no config and status).", "run.json is not one "
                          "nbtune wrote")
    schema = data.get("schema", 1)
    if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
        raise RecordError(f"run.json is not one Run.save wrote (schema {schema!r}).", "run.json is not one "
                          "nbtune wrote")
    if schema > SCHEMA:
        why = f"run.json of a newer nbtune (schema {schema}; this one reads up to {SCHEMA})"
        raise RecordError(f"{why}: upgrade nbtune to open it.", why)
    record = migrate(data)
    for key, types in _FIELDS.items():
        value = record.get(key)
        if not isinstance(value, types) or (types == (int,) and isinstance(value, bool)):
            why = f"run.json's `{key}` is {type(value).__name__}, not {' or '.join(_type_name(t) for t in types)}"
            raise RecordError(f"{why}: the file was edited or is not one nbtune wrote.", why)
    if record["status"] not in STATUSES:
        why = f"run.json's status {record['status']!r} is none of {', '.join(STATUSES)}"
        raise RecordError(f"{why}.", why)
    if not all(isinstance(step, dict) for step in record["history"]):
        raise RecordError("run.json's history holds something other than step records.", "run.json's history is "
                          "not step records")
    return record


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of `data` in the current schema (each older schema upgraded one version at a time)."""
    record = dict(data)
    if record.get("schema", 1) == 1:
        record = _from_schema_1(record)
    return record


def _from_schema_1(old: dict[str, Any]) -> dict[str, Any]:
    """Schema 1: what `Run.to_dict` wrote before the file said its version. Over its releases it wrote no `id`
    (the first ones), no `save_format`, `samples` or `provenance` (added one by one), a `given` copy of the
    config as written (one release), and never `total_steps`, `base_name` or `saved_to`. Its configs hold
    `beta: null`, `loss_type: null`, `precompute_ref: false` whatever the objective, and spell the sweep's metric
    `sweep: {objective: ...}`."""
    record = {key: value for key, value in old.items() if key != "given"}  # the config again, as it was given
    config = dict(record["config"])
    for key, default in _V1_OBJECTIVE_DEFAULTS:
        if key in config and config[key] == default:
            del config[key]
    sweep = config.get("sweep")
    if isinstance(sweep, dict) and _V1_SWEEP_METRIC in sweep and SWEEP_METRIC not in sweep:
        config["sweep"] = {(SWEEP_METRIC if key == _V1_SWEEP_METRIC else key): value for key, value in sweep.items()}
    record["config"] = config
    metrics = record.get("metrics") if isinstance(record.get("metrics"), dict) else {}
    history = record.get("history") if isinstance(record.get("history"), list) else []
    reached = history[-1].get("step") if history and isinstance(history[-1], dict) else None
    model = (record.get("provenance") or {}).get("model") if isinstance(record.get("provenance"), dict) else None
    for key, value in (("id", None), ("error", None), ("eval_history", []), ("samples", []), ("provenance", {})):
        record.setdefault(key, value)
    record.setdefault("name", config.get("name"))
    record.setdefault("method", config.get("method", RunConfig.method))
    record.setdefault("save_format", _save_format(config))
    record.setdefault("nbtune_version", None)
    # The steps it was to take were never written: `steps` when the config set them, else how far it got
    # (which `metrics.steps` says for a run that ended), as history() has always shown them.
    record["total_steps"] = int(config.get("steps") or metrics.get("steps") or reached or 0)
    record["base_name"] = model.get("name") if isinstance(model, dict) else None
    record["saved_to"] = None  # where it is now is the folder it is read from
    record["schema"] = SCHEMA
    return record


def _save_format(config: dict[str, Any]) -> str | None:
    """What a schema-1 run saved, asked of its method as a save would; None where the method is not known."""
    try:
        method = get_method(config.get("method", RunConfig.method))
        return method.save_format({**method.default_options(), **config})
    except (NbtuneError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------- a record back as a Run
def config_of(record: dict[str, Any], *, reopened: bool = True, quantization: str | None = None) -> RunConfig:
    """The config a record holds, parsed as this nbtune reads it. `reopened`: read from a folder, whose run
    saves again to runs/<name>, not where it was saved then. `quantization` overrides how its base loads."""
    given = dict(record["config"])
    if reopened:
        given.pop("output_dir", None)
    given["metric"] = openable_metric(given.get("metric", "auto"))
    if quantization is not None:
        given["quantization"] = quantization
    return RunConfig.parse(given)


def parts_of(record: dict[str, Any], config: RunConfig,
             tokenizer: Any = None) -> tuple[MethodSpec, MethodContext]:
    """The method (from the registry) and a `MethodContext` for a Run rebuilt from `record`: a fresh scratch
    folder, since the one it trained with belonged to another process."""
    context = MethodContext(options=config.options, config=config,
                            workdir=Path(tempfile.mkdtemp(prefix="nbtune-saved-")),
                            quantized=config.quantization != "none", tokenizer=tokenizer)
    context.total_steps = record["total_steps"]
    return get_method(config.method), context


def restore(run: Run, record: dict[str, Any], folder: str | Path | None = None) -> Run:
    """Every recorded field of `record` onto `run` (`Run.from_dict`); from a `folder`, also the prediction rows
    beside its run.json, and the folder as where it is saved."""
    run.name = record["name"]
    if record["id"] is not None:  # a schema-1 file from before ids: the folder holds this run all the same
        run.id = record["id"]
    run.error = record["error"]
    run.metrics = dict(record["metrics"])
    run.history = type(run.history)(record["history"])  # records/run.py's History: `.df` as before
    run.eval_history = list(record["eval_history"])
    run.samples = list(record["samples"])
    run.provenance = dict(record["provenance"])
    run.total_steps = record["total_steps"]
    run.base_name = record["base_name"]
    if folder is not None:
        run.saved_to = Path(folder)
        run.prediction_rows = read_rows(Path(folder))  # the rows scored when it trained: shown without generating
    else:
        run.saved_to = Path(record["saved_to"]) if record["saved_to"] is not None else None
    return run


def holds_run(folder: str | Path, run_id: str | None, *, unrecorded: bool = False) -> bool:
    """Whether `folder`'s run.json is the run with id `run_id`. A record without an id (from before runs had
    ids) counts as `unrecorded` says."""
    record = try_read_record(folder)
    if record is None:
        return False
    return unrecorded if record["id"] is None else record["id"] == run_id


def other_saved_run(target: Path, run_id: str, config: dict[str, Any]) -> str | None:
    """What `target` holds when it is another run whose config differs from `config` (a cell changed and run
    again, another method under the same name): its method, status, steps and when it was saved. The same
    cell run again replaces its own earlier result without a word, as a notebook re-run should."""
    import datetime

    saved = try_read_record(target)
    if saved is None or saved["id"] == run_id:
        return None
    if {k: v for k, v in saved["config"].items() if k != "derived"} == {k: v for k, v in config.items()
                                                                          if k != "derived"}:
        return None
    steps = saved["history"][-1].get("step", 0) if saved["history"] else 0
    when = datetime.datetime.fromtimestamp(record_file(target).stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    return f"method {saved['method']}, {saved['status']} at step {steps}, saved {when}"


def openable_metric(spec: Any) -> Any:
    """A saved run's `metric` with the 'module:function' paths that no longer import left out: the scores they
    gave are in its metrics and predictions; the run must open wherever that module is missing."""
    from nbtune.engine.evaluation.metrics import check_metric_spec

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


def _known_status(status: str) -> str:
    if status not in STATUSES:
        raise ValueError(f"unknown run status {status!r}; one of {', '.join(STATUSES)}")
    return status


def _type_name(kind: type) -> str:
    return "null" if kind is type(None) else {"str": "text", "dict": "a mapping", "list": "a list"}.get(
        kind.__name__, kind.__name__)


__all__ = ["CHECKPOINTS_SUFFIX", "PREDICTIONS", "RECORD", "SCHEMA", "STATUSES", "RecordError", "checked",
           "checkpoints_folder", "config_of", "holds_run", "is_run_folder", "migrate", "newest_checkpoint",
           "other_saved_run", "parts_of", "read_record", "record_of", "restore", "rewrite_status", "write_record",
           "write_run"]
