"""Runs saved on disk, from any earlier kernel: a table of every run under a folder, and saved runs as
records that `nbtune.compare` puts next to the kernel's own.

    >>> nbtune.history()                       # every run saved under ./runs, newest first   # doctest: +SKIP
    >>> nbtune.history("runs").df              # the same as a DataFrame                     # doctest: +SKIP
    >>> nbtune.compare("lora_today", nbtune.history()["lora_last_week"])                    # doctest: +SKIP

A row comes from the folder's `run.json` alone (no weights are read). A run whose process died while it
trained left only its periodic checkpoints (`<output_dir>-checkpoints`): it is listed as interrupted, with
the checkpoint `nbtune.finetune(config, resume_from="latest")` continues from. A damaged or foreign
`run.json` is a row that says so; it never breaks the table. A sweep's trials (`<sweep>/<trial>`, saved
in `runs/<sweep>/<trial>` beside the sweep's study) are rows of their own, one folder level down.
"""

from __future__ import annotations

import datetime as dt
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbtune.engine.records import run_folder
from nbtune.engine.records.run import Run
from nbtune.engine.records.run_folder import CHECKPOINTS_SUFFIX, RecordError, record_file
from nbtune.engine.records.text import cell
from nbtune.errors import NbtuneError

COLUMNS = ("name", "method", "status", "saved", "steps", "train_loss", "eval_loss", "exact_match", "adapter_mb",
           "resume_from", "folder")


@dataclass(frozen=True)
class SavedRun:
    """One run folder: what its run.json says (`info`: the record, checked and in the current schema, see
    engine/records/run_folder.py), or why it could not be read (`problem`)."""

    path: Path
    info: dict[str, Any] = field(default_factory=dict, repr=False)
    problem: str | None = None
    resume_from: Path | None = None  # the newest complete checkpoint of an unfinished run
    key: str = ""  # the run's folder under the listed root ('sweep/3' for a trial): a name when run.json has none

    @property
    def name(self) -> str:
        return str(self.info.get("name") or self.key or self.path.name.removesuffix(CHECKPOINTS_SUFFIX))

    def row(self) -> dict[str, Any]:
        metrics, history = self.info.get("metrics") or {}, self.info.get("history") or []
        steps = history[-1].get("step", 0) if history else metrics.get("steps", 0)
        total = self.info.get("total_steps") or steps
        status = "unreadable" if self.problem else self.info.get("status", "?")
        if self.resume_from is not None and status != "finished":
            status = "interrupted" if status in ("running", "pending") else status
        return {"name": self.name, "method": self.info.get("method", "-"), "status": status,
                "saved": _when(self.path), "steps": f"{steps}/{total}" if not self.problem else "-",
                "train_loss": metrics.get("train_loss"), "eval_loss": metrics.get("eval_loss"),
                "exact_match": metrics.get("exact_match"), "adapter_mb": saved_mb(self.path),
                "resume_from": str(self.resume_from) if self.resume_from is not None else None,
                "folder": str(self.path) + (f" ({self.problem})" if self.problem else "")}


class RunHistory(list):
    """Saved runs, newest first; `h["name"]` is the newest run of that name, `.df` a DataFrame."""

    def __init__(self, root: Path, runs: list[SavedRun]) -> None:
        super().__init__(runs)
        self.root = root

    def __getitem__(self, key: Any) -> Any:
        if not isinstance(key, str):
            return super().__getitem__(key)
        for saved in self:
            if saved.name == key and saved.problem is None:
                return saved
        names = sorted({s.name for s in self if s.problem is None})
        raise NbtuneError(f"no saved run {key!r} under {self.root}; saved runs: {', '.join(names) or 'none'}.")

    def table(self) -> list[dict[str, Any]]:
        return [saved.row() for saved in self]

    @property
    def df(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.table(), columns=list(COLUMNS))

    def __repr__(self) -> str:
        rows = self.table()
        if not rows:
            return f"no saved runs under {self.root}"
        shown = [c for c in COLUMNS if c != "folder"]
        lines = ["  ".join(f"{c:<12}" for c in shown)]
        lines += ["  ".join(f"{cell(r[c]):<12}" for c in shown) for r in rows]
        return "\n".join(lines)


def history(root: str | Path = "runs") -> RunHistory:
    """Every run saved under `root` (its run folders and the checkpoints of unfinished ones), newest first."""
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise NbtuneError(f"there is no folder {str(root)!r} (from {Path.cwd()}) to list runs from; give the "
                          "folder runs were saved in (the parent of their output_dir; 'runs' by default).")
    found: dict[str, SavedRun] = {}
    for parent in [folder, *_sweep_folders(folder)]:
        prefix = "" if parent == folder else f"{parent.name}/"  # a trial's key is `<sweep>/<trial>`, its name
        for path in _subfolders(parent):
            if not path.name.endswith(CHECKPOINTS_SUFFIX) and record_file(path).exists():
                found[prefix + path.name] = _read(path, key=prefix + path.name)
        for path in sorted(parent.glob(f"*{CHECKPOINTS_SUFFIX}")):
            _add_checkpoints(found, path, prefix)
    return RunHistory(folder, sorted(found.values(), key=lambda s: _mtime(s.path), reverse=True))


def _subfolders(parent: Path) -> list[Path]:
    # Hidden folders are a save in progress (engine/records/saving.py writes `.<name>.tmp-*` and renames it).
    return sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))


def _sweep_folders(root: Path) -> list[Path]:
    """The folders under `root` that may hold a sweep's trials: any that is neither a run (no run.json) nor
    a run's checkpoints. A sweep's own folder holds its study and trial folders, never a run.json: it is
    looked into, not listed (nor taken for a damaged run)."""
    return [p for p in _subfolders(root) if not p.name.endswith(CHECKPOINTS_SUFFIX) and not record_file(p).exists()]


def _read(path: Path, *, record_in: Path | None = None, key: str = "") -> SavedRun:
    """The run in `path` (its record read from `record_in`, a checkpoint of it, when given)."""
    try:
        return SavedRun(path, run_folder.read_record(record_in or path), key=key)
    except RecordError as exc:
        return SavedRun(path, problem=exc.why, key=key)


def _add_checkpoints(found: dict[str, SavedRun], folder: Path, prefix: str = "") -> None:
    """An unfinished run's newest complete checkpoint: its own row when the run never saved, else the run's
    row says where to resume from. `prefix`: `<sweep>/` for a trial's (`runs/<sweep>/<trial>-checkpoints`)."""
    newest = run_folder.newest_checkpoint(folder)
    if newest is None:
        return
    key = prefix + folder.name.removesuffix(CHECKPOINTS_SUFFIX)
    saved = found.get(key)
    if saved is None:
        state = _read(folder, record_in=newest, key=key)
        found[key] = SavedRun(folder, state.info, state.problem, newest, key)
    elif saved.problem is None and saved.info["status"] != "finished":
        found[key] = SavedRun(saved.path, saved.info, None, newest, key)


# ---------------------------------------------------------------- saved runs as records, for compare
_FROM_DISK: weakref.WeakSet[Run] = weakref.WeakSet()  # records whose model loads on demand


def saved_record(where: str | Path | SavedRun) -> Run:
    """A `Run` record of a saved run (config, status, metrics, history, every field run.json holds; no model
    yet: `with_model` loads it onto the kernel's cached base when answers are asked for). Rebuilt as
    `nbtune.load` rebuilds one (`Run.from_dict`)."""
    saved = where if isinstance(where, SavedRun) else _read(Path(where).expanduser())
    if saved.problem is not None or (saved.resume_from is not None and not record_file(saved.path).exists()):
        why = saved.problem or "it has checkpoints only (resume it, then compare)"
        raise NbtuneError(f"{str(saved.path)!r} cannot be compared: {why}.")
    run = Run.from_dict(saved.info, folder=saved.path)
    _FROM_DISK.add(run)
    return run


def with_model(run: Run) -> Run:
    """`run` holding its model: a saved run's record gets it loaded now, onto the kernel's cached base."""
    if run.model is not None or run not in _FROM_DISK:
        return run
    from nbtune.engine.bases.kernel_cache import kernel_view_for
    from nbtune.engine.records.reopen import load

    loaded = load(run.saved_to, view_for=kernel_view_for())  # the base it trained on: cached, or rebuilt
    run.model, run.tokenizer, run.eval_pairs = loaded.model, loaded.tokenizer, loaded.eval_pairs
    run.provenance = loaded.provenance
    run.base_name = loaded.base_name
    return run


def saved_mb(folder: Path) -> float | None:
    """Size on disk of what a run saved (adapter or weights), without tokenizer and run.json."""
    if not folder.is_dir():
        return None
    skip = {run_folder.RECORD, "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "special_tokens_map.json", "generation_config.json", run_folder.PREDICTIONS}
    return round(sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.name not in skip) / 2**20, 2)


def _mtime(path: Path) -> float:
    marker = record_file(path)
    return (marker if marker.exists() else path).stat().st_mtime


def _when(path: Path) -> str:
    return dt.datetime.fromtimestamp(_mtime(path)).strftime("%Y-%m-%d %H:%M")



__all__ = ["RunHistory", "SavedRun", "history", "saved_mb", "saved_record", "with_model"]
