"""What it takes to repeat a run, recorded in its run.json under "provenance".

The package versions, the device and the precision it trained in, the base model's folder and a SHA-256
of each of its weights files, a SHA-256 of the training (and evaluation) rows, the seed, and the commit of
the git repository the notebook runs in. `of_run` collects it as the pipeline starts a run; `changes` tells
`nbtune.load` what no longer matches.

    >>> run.provenance["model"]["weights"]                  # doctest: +SKIP
    {'model.safetensors': 'a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd'}
    >>> run.provenance["git"]                               # doctest: +SKIP
    {'root': '/home/me/project', 'commit': '43b2b56...', 'dirty': False}

Costs: the weights' SHA-256 reads every byte (0.53 s for SmolLM2's 538 MB fp32 file, ~1 GB/s), so each
file's digest is kept in nbtune's cache, keyed by the file's path, size, mtime, ctime and inode, and paid
once (9 ms for the whole record afterwards); the rows' SHA-256 costs under 1 ms per 1,000 short rows (0.09 s for
100k demo rows); git's two questions about 6 ms, and at most 2 s each in a slow repository.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbtune.engine.bases.loading import merged_from

if TYPE_CHECKING:
    from nbtune.config import RunConfig
    from nbtune.engine.bases.loading import Base
    from nbtune.engine.records.run import Run

PACKAGES = ("nbtune", "torch", "transformers", "peft", "datasets", "accelerate")
_ROWS_PER_BATCH = 1000  # part of the data fingerprint's definition: changing it changes every fingerprint
_GIT_SECONDS = 2.0  # a network file system or a huge repository must not hold up a run's start


def of_run(run: Run, base: Base, data: tuple[Any, Any, str]) -> dict[str, Any]:
    """Everything `run` needs to be repeated, as plain JSON values; `data` is (train, eval, format)."""
    config = run.config
    quantized = str(config.quantization) != "none"
    return {
        "versions": versions(("bitsandbytes",) if quantized else ()),
        **device_and_precision(config),
        "model": model_record(run, base),
        "data": data_record(*data),
        "seed": config.seed,
        "git": git_state(),
    }


# ---------------------------------------------------------------- software and hardware
def versions(extra: tuple[str, ...] = ()) -> dict[str, str | None]:
    """Python's and each package's version (None when not installed)."""
    import torch

    found: dict[str, str | None] = {"python": platform.python_version()}
    found.update({name: _version(name) for name in (*PACKAGES, *extra)})
    found["cuda"] = torch.version.cuda  # the CUDA torch was built for (None on a CPU build)
    return found


def _version(name: str) -> str | None:
    # The imported module's own version first: what this process runs, even from a source checkout whose
    # installed metadata is older.
    version = getattr(sys.modules.get(name), "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None
    return str(version)


def device_and_precision(config: RunConfig) -> dict[str, Any]:
    """The device the run trained on and the precision it trained in (engine/compute/device.py decides them)."""
    from nbtune.engine.compute import device

    policy = device.current()
    hardware = policy.device
    return {
        "device": {"type": hardware.type, "name": hardware.name, "machine": platform.machine(),
                   "capability": list(hardware.capability) if hardware.capability else None,
                   "processes": config.num_processes},
        "precision": {"compute": config.precision, "dtype": config.dtype, "quantization": str(config.quantization),
                      "attention": policy.attention},
    }


# ---------------------------------------------------------------- the base model
def model_record(run: Run, base: Base) -> dict[str, Any]:
    """The base's name, the folder its weights were read from, and a SHA-256 of each weights file. A model
    passed in memory has no folder: it is recorded as such (`in_memory`), with a fingerprint of its weights
    (`weights_sample_fingerprint`) and, for a model `run.merge()` made, the run it was merged from, so that
    reopening the run can rebuild that base or say how to pass it, never put the adapter on another model."""
    folder = model_folder(run, base)
    in_memory = folder is None and run.trained_on_a_base_in_memory
    return {"name": base.name, "path": str(folder) if folder is not None else None,
            "weights": weights_fingerprint(folder) if folder is not None else None,
            "in_memory": in_memory,
            "merged_from": merged_from(base.model) if in_memory else None,
            "fingerprint": weights_sample_fingerprint(base.model) if in_memory else None}


_SAMPLED_VALUES = 4096  # per tensor: enough to tell two trainings apart, cheap on a GPU and for billions of weights


def weights_sample_fingerprint(model: Any) -> str:
    """A SHA-256 over every tensor's name, shape, dtype and an evenly strided sample of its values: the same
    weights give the same digest on any device; a model trained or merged differently, another one. Sampled
    because a model in memory has no file to hash, and hashing every byte would copy a GPU model to the CPU."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLED_VALUES)
        sample = flat[::step][:_SAMPLED_VALUES].contiguous().cpu()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def trained_in_memory(recorded: dict[str, Any], model: str) -> bool:
    """Whether a saved run's base was a model passed in memory (so `config.model` is not its base). run.json
    files from before `in_memory` was recorded: no folder, no weights' digests, and a name that is not the
    config's model (a cached base's record always has its folder)."""
    if "in_memory" in recorded:
        return bool(recorded["in_memory"])
    from nbtune.engine.bases.loading import ALIASES

    return bool(recorded) and recorded.get("path") is None and recorded.get("name") not in (
        model, ALIASES.get(model, model))


def model_folder(run: Run, base: Base) -> Path | None:
    """Where `base` was loaded from, when nbtune loaded it."""
    if base.path is not None:
        return Path(base.path)
    if run.trained_on_a_base_in_memory:
        return None
    # A view of the workbench's cached base has no `path`; load_base named its model after the folder.
    named = Path(getattr(base.model, "name_or_path", "") or "")
    return named if named.is_absolute() and (named / "config.json").is_file() else None


def weights_fingerprint(folder: Path) -> dict[str, str]:
    """{file name: SHA-256} of the folder's safetensors files (what load_base reads; sharded models have
    several)."""
    return {file.name: file_sha256(file) for file in sorted(Path(folder).glob("*.safetensors"))}


def file_sha256(path: Path) -> str:
    """The SHA-256 of the file's bytes, from nbtune's cache when the file is unchanged since it was hashed.

    Size and mtime alone would miss a rewrite that keeps them (`touch -r`); ctime and the inode change on
    any write or replacement and cannot be set back, so the cache can only miss, never lie, short of a
    changed clock."""
    path = Path(path).resolve()  # the Hugging Face cache links snapshot files to blobs
    info = path.stat()
    stamp = [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]
    known = _read_digests()
    entry = known.get(str(path))
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        return str(entry["sha256"])
    with path.open("rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    known[str(path)] = {"stamp": stamp, "sha256": digest}
    _write_digests(known)
    return digest


def _digests_file() -> Path:
    from nbtune.engine.bases.loading import cache_dir

    return cache_dir() / "fingerprints.json"


def _read_digests() -> dict[str, Any]:
    try:
        known = json.loads(_digests_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or damaged: hashing again is all it costs
        return {}
    return known if isinstance(known, dict) else {}


def _write_digests(known: dict[str, Any]) -> None:
    # Files that are gone (tests' temporary models, deleted snapshots) leave the cache; the write is a rename,
    # so processes hashing at once (the ranks of one run) never read half a file.
    kept = {name: entry for name, entry in known.items() if Path(name).is_file()}
    target = _digests_file()
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(kept, indent=1), encoding="utf-8")
        os.replace(partial, target)
    except OSError:  # a read-only cache: the digest is still right, only paid again next time
        partial.unlink(missing_ok=True)


# ---------------------------------------------------------------- the data
def data_record(train: Any, evaluation: Any, fmt: str) -> dict[str, Any]:
    """Row counts and SHA-256 of the training and evaluation rows as they were read (after column renames)."""
    return {"format": fmt, "train": rows_fingerprint(train),
            "eval": rows_fingerprint(evaluation) if evaluation is not None else None}


def rows_fingerprint(dataset: Any) -> dict[str, Any]:
    """{"rows": n, "sha256": ...} of a `datasets.Dataset`'s rows as JSON, whatever file or object they came from.

    Not `Dataset._fingerprint`: that hashes how the dataset was made (and datasets' version), so the same rows
    from a JSONL file and from a list differ, and an upgrade of datasets would call unchanged data changed."""
    digest = hashlib.sha256()
    for batch in dataset.iter(batch_size=_ROWS_PER_BATCH):
        digest.update(json.dumps(batch, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))
    return {"rows": len(dataset), "sha256": digest.hexdigest()}


def data_recheckable(config: RunConfig) -> bool:
    """Whether `load` can read the run's data again as it was given: 'demo' or local files. In-memory data
    was not saved (run.json names only its type), and a hub name would go to the network."""

    def local(source: Any) -> bool:
        return isinstance(source, str) and (source in ("demo", "demo_pairs") or Path(source).expanduser().is_file())

    return local(config.data) and (config.eval_data is None or local(config.eval_data))


# ---------------------------------------------------------------- the notebook's repository
def git_state(folder: Path | None = None) -> dict[str, Any] | None:
    """The commit checked out in the git repository around `folder` (default: the working folder, where a
    notebook runs), and whether tracked files differ from it; None outside a repository or without git."""
    head = _git(["rev-parse", "--show-toplevel", "HEAD"], folder)
    if head is None or len(head.split()) != 2:
        return None
    root, commit = head.split()
    # Untracked files do not count (as `git describe --dirty`): outputs such as runs/ would make every tree dirty.
    status = _git(["status", "--porcelain", "--untracked-files=no"], folder)
    return {"root": root, "commit": commit, "dirty": None if status is None else bool(status.strip())}


def _git(args: list[str], folder: Path | None) -> str | None:
    # GIT_OPTIONAL_LOCKS=0: `git status` may otherwise refresh and lock the index while the user commits.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        done = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=_GIT_SECONDS,
                              env=env, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):  # no git, or too slow
        return None
    return done.stdout if done.returncode == 0 else None


# ---------------------------------------------------------------- checking a saved run again
def changes(recorded: dict[str, Any], *, data: tuple[Any, Any, str] | None = None,
            model_folder: Path | None = None) -> list[str]:
    """One line for each recorded item that differs now: the data read again (train, eval, format), the
    weights in `model_folder`. Items not recorded (run.json from before provenance) or not given are not
    checked."""
    found = []
    then_data = recorded.get("data") or {}
    if data is not None and then_data:
        now = data_record(*data)
        for part, name in (("train", "training data (`data`)"), ("eval", "evaluation data")):
            if then_data.get(part) is not None and now[part] != then_data[part]:
                found.append(f"its {name} changed since it trained: {_short(then_data[part])} then, "
                             f"{_short(now[part])} now")
    then_weights = (recorded.get("model") or {}).get("weights")
    if model_folder is not None and then_weights:
        now_weights = weights_fingerprint(model_folder)
        if now_weights != then_weights:
            differ = sorted(set(now_weights) ^ set(then_weights) | {
                name for name in set(now_weights) & set(then_weights) if now_weights[name] != then_weights[name]})
            found.append(f"its base model's weights in {str(model_folder)!r} changed since it trained "
                         f"({', '.join(differ)} differ): the adapter now sits on other weights")
    return found


def _short(part: Any) -> str:
    if not isinstance(part, dict):
        return "none"
    return f"{part.get('rows')} rows, sha256 {str(part.get('sha256'))[:12]}"


__all__ = ["changes", "data_recheckable", "data_record", "file_sha256", "git_state", "model_folder",
           "of_run", "rows_fingerprint", "trained_in_memory", "versions", "weights_fingerprint",
           "weights_sample_fingerprint"]
