"""Checkpoints that are either complete and verified, or ignored.

The Trainer writes the checkpoint itself (adapter or weights, optimizer, scheduler, RNG states, trainer
state): that is the format its `resume_from_checkpoint` restores exactly, data position included. What
it does not do is survive a crash inside a save: it writes straight into `checkpoint-N`, so a killed
process leaves a folder that looks like a checkpoint and is not one. Here the Trainer writes into a
staging folder; nbtune then adds the run's record so far (run.json, engine/records/run_folder.py) and a
manifest (size and SHA-256 of every file), and renames the folder into place, so `checkpoint-N` exists only
when complete. Resume verifies the manifest and falls back to the newest checkpoint that passes, saying
which ones it skipped and why.

Hand-written because neither transformers nor accelerate verifies a checkpoint before resuming from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbtune.engine.records import run_folder
from nbtune.engine.records.run_folder import CHECKPOINT_MANIFEST as MANIFEST
from nbtune.engine.records.run_folder import CHECKPOINT_PREFIX as PREFIX
from nbtune.engine.records.run_folder import checkpoint_step as _step
from nbtune.errors import NbtuneError, NbtuneWarning

if TYPE_CHECKING:
    from nbtune.engine.records.run import Run

STAGING = ".staging"


class AtomicCheckpoints:
    """Trainer mixin: `_save_checkpoint` stages, verifies and renames; older ones beyond `keep` go."""

    keep_checkpoints: int = 2
    checkpoint_extra: dict[str, Any] = {}
    checkpoint_record: Callable[[], dict[str, Any]] | None = None  # the run's run.json so far, put in each one
    _staging_root: Path | None = None

    def _get_output_dir(self, trial: Any) -> str:
        if self._staging_root is not None:
            return str(self._staging_root)
        return super()._get_output_dir(trial)  # type: ignore[misc]

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        from nbtune.engine.training.distributed import barrier

        root = Path(super()._get_output_dir(trial))  # type: ignore[misc]
        staging = root / STAGING
        if self.args.should_save:  # type: ignore[attr-defined]  # rank 0
            shutil.rmtree(staging, ignore_errors=True)  # what a crash inside an earlier save left
        barrier()  # with several processes each writes its own RNG state into the staging folder
        self._staging_root = staging
        try:
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
        finally:
            self._staging_root = None
        barrier()  # all ranks' files are in before the manifest seals the folder
        step = self.state.global_step  # type: ignore[attr-defined]
        if self.args.should_save:  # type: ignore[attr-defined]  # rank 0 only
            if self.checkpoint_record is not None:  # sealed by the manifest like the Trainer's own files
                run_folder.write_record(staging / f"{PREFIX}{step}", self.checkpoint_record())
            publish(staging / f"{PREFIX}{step}", root, extra={"step": step, **self.checkpoint_extra})
            shutil.rmtree(staging, ignore_errors=True)
            prune(root, keep=self.keep_checkpoints)
        barrier()  # nobody reads or resumes from a checkpoint rank 0 has not published yet


def publish(folder: Path, root: Path, *, extra: dict[str, Any]) -> Path:
    """Write `folder`'s manifest, flush it all to disk, and rename it into `root` (atomic on one disk)."""
    files = {p.relative_to(folder).as_posix(): _digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / MANIFEST).write_text(json.dumps({"files": files, **extra}, indent=1, default=str))
    for path in [*folder.rglob("*"), folder]:
        _fsync(path)
    target = root / folder.name
    if target.exists():
        shutil.rmtree(target)
    os.replace(folder, target)
    _fsync(root)
    return target


def verify(folder: Path) -> str | None:
    """None when `folder` is a complete checkpoint whose files match its manifest, else what is wrong."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no manifest (incomplete: the save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return "its manifest is unreadable"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, expected {expected['size']}"
        if _digest(path)["sha256"] != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest_good(root: Path, *, before: Path | None = None) -> Path | None:
    """The newest verified checkpoint under `root` (older than `before`, if given); each newer one that
    fails verification is reported in a warning."""
    limit = _step(before) if before is not None else None
    candidates = sorted((p for p in root.glob(f"{PREFIX}*") if p.is_dir() and _step(p) is not None
                         and (limit is None or _step(p) < limit)), key=_step, reverse=True)
    for folder in candidates:
        problem = verify(folder)
        if problem is None:
            return folder
        warnings.warn(f"skipping {folder.name}: {problem}; trying an earlier checkpoint.", NbtuneWarning, stacklevel=2)
    return None


def prune(root: Path, *, keep: int) -> None:
    """Delete all but the `keep` newest verified checkpoints (a damaged one is never the only one kept)."""
    good = [p for p in sorted(root.glob(f"{PREFIX}*"), key=lambda p: _step(p) or -1, reverse=True)
            if _step(p) is not None and (p / MANIFEST).is_file()]
    for folder in good[keep:]:
        shutil.rmtree(folder, ignore_errors=True)


def _digest(path: Path) -> dict[str, Any]:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return {"size": path.stat().st_size, "sha256": sha.hexdigest()}


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def checkpoint_root(config: Any, scratch: Path) -> Path:
    """Where the Trainer's checkpoints go: beside the run's output when they are periodic (they must
    outlive the process), else the run's `scratch` folder (a Stop's checkpoint is for `resume()` here)."""
    if config.checkpoint_steps:  # beside the output folder, which the final save replaces whole
        return run_folder.checkpoints_folder(config.resolved_output_dir)
    return scratch / "trainer"  # all ranks of a run write into one


def resume_checkpoint(run: Run, where: str | Path, scratch: Path | None = None) -> str:
    """The verified checkpoint to resume `run` from: the newest good one under its checkpoint folder
    ("latest"), or `where` itself, or, when `where` is damaged, the newest good one before it; refused
    when the run's settings cannot continue it (see `check_compatible`). `scratch`: the run's scratch
    folder (its method's by default), where checkpoints go when they are not periodic."""
    folder = _find_checkpoint(run, where, scratch or run.context.workdir)
    for warning in check_compatible(folder, run.config):
        warnings.warn(warning, NbtuneWarning, stacklevel=3)
    return str(folder)


def _find_checkpoint(run: Run, where: str | Path, scratch: Path) -> Path:
    if str(where) == "latest":
        root = checkpoint_root(run.config, scratch)
        found = latest_good(root) if root.is_dir() else None
        if found is None:
            hint = "" if run.config.checkpoint_steps else " (set `checkpoint_steps` so that runs leave some)"
            raise NbtuneError(f"no complete checkpoint in {root} to resume run {run.name!r} from{hint}.",
                              field="checkpoint_steps")
        return found
    folder = Path(where)
    problem = verify(folder) if folder.is_dir() else "it does not exist"
    if problem is None:
        return folder
    older = latest_good(folder.parent, before=folder) if folder.parent.is_dir() else None
    if older is None:
        raise NbtuneError(f"cannot resume from {folder}: {problem}, and no earlier complete checkpoint is there.")
    warnings.warn(f"{folder.name}: {problem}; resuming from {older.name} instead.", NbtuneWarning, stacklevel=4)
    return older


# A checkpoint's adapter and optimizer state only fit the model, method, options and quantization they were
# made with; its data position only means the same rows under the same global batch.
_MUST_MATCH = ("model", "method", "quantization")
# Restored from the checkpoint along with the optimizer and scheduler, whatever the config now says.
_CHECKPOINT_WINS = ("lr", "lr_scheduler", "warmup_steps", "weight_decay")


def check_compatible(folder: Path, config: Any) -> list[str]:
    """Raise `NbtuneError` (naming the setting) when `config` cannot continue the checkpoint in `folder`;
    return warnings for settings the checkpoint overrides or that change the data order. Checkpoints
    without nbtune's run.json (made elsewhere) are not checked."""
    from nbtune.engine.training.distributed import launched, world_size

    record = run_folder.try_read_record(folder)  # in the current schema, whichever nbtune wrote it
    if record is None:
        return []
    saved = record["config"]
    now = config.to_json_dict()
    keys = [*_MUST_MATCH, *sorted(config.options)]
    for key in keys:
        if key in saved and saved[key] != now.get(key):
            raise NbtuneError(f"cannot resume from {folder.name}: it was made with `{key}: {saved[key]}`, this run "
                              f"has `{key}: {now.get(key)}`. Resume with the checkpoint's value, or start afresh "
                              "(without --resume / resume_from).", field=key)
    processes = world_size() if launched() else config.num_processes
    saved_processes = max(len(list(folder.glob("rng_state_*.pth"))), 1)
    batch = config.batch_size * config.grad_accum * processes
    saved_batch = saved.get("batch_size", 0) * saved.get("grad_accum", 1) * saved_processes
    if saved_batch and batch != saved_batch:
        raise NbtuneError(f"cannot resume from {folder.name}: its global batch (batch_size x grad_accum x processes) "
                          f"was {saved_batch}, this run's is {batch}; the data position would point at other "
                          "rows. Keep the product the same.", field="batch_size")
    warnings_ = [f"resuming {folder.name}: `{key}` comes back from the checkpoint ({saved[key]}), not this "
                 f"run's {now.get(key)}." for key in _CHECKPOINT_WINS if key in saved and saved[key] != now.get(key)]
    if "seed" in saved and saved["seed"] != config.seed:
        warnings_.append(f"resuming {folder.name}: `seed` changed ({saved['seed']} -> {config.seed}), so the rest "
                         "of the data comes in another order than the interrupted run's.")
    return warnings_


@cache
def run_trainer_class() -> type:
    """The Trainer nbtune runs: answer-only loss (engine/training/loss.py), atomic, verified checkpoints, and a data
    order fixed by seed and epoch, the same in any number of processes (engine/training/sampling.py)."""
    from nbtune.engine.training.loss import AnswerOnlyLossTrainer
    from nbtune.engine.training.sampling import DataOrder

    return type("RunTrainer", (AtomicCheckpoints, DataOrder, AnswerOnlyLossTrainer), {})


__all__ = ["AtomicCheckpoints", "check_compatible", "checkpoint_root", "latest_good", "prune", "publish",
           "resume_checkpoint", "run_trainer_class", "verify"]
