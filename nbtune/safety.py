"""What nbtune refuses by default when a config or a folder comes from someone else.

A config file or a saved run downloaded from the internet must not be able to overwrite the user's files,
run code, or unpickle objects. `output_dir` may be any folder the user names (relative, absolute or `~`):
what keeps their files safe is that a save only goes into a new folder, an empty one, or one nbtune wrote
(nbtune/engine/records/saving.py). An admin who wants more can confine output to some folders with the environment
variable `NBTUNE_WORKSPACE` (`check_output_dir`). Here too: the checks on folders before anything is loaded
from them (no pickle weights, sane safetensors headers). `trust_remote_code` is a per-run setting
(`RunConfig.trust_remote_code`, default false).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from nbtune.errors import ConfigError, NbtuneError

# safetensors' own reader refuses headers over 100 MB; a header that size is already absurd for a model.
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def workspace_roots() -> list[Path]:
    """The folders runs may write in when an admin confines them: the current folder (the notebook's) plus
    those listed in the environment variable `NBTUNE_WORKSPACE` (os.pathsep-separated), set by whoever
    starts the kernel. Empty when `NBTUNE_WORKSPACE` is unset or empty: then `output_dir` may be anywhere."""
    extra = [Path(p).expanduser().resolve() for p in os.environ.get("NBTUNE_WORKSPACE", "").split(os.pathsep) if p]
    return [Path.cwd().resolve(), *extra] if extra else []


def check_output_dir(output_dir: str | Path) -> None:
    """Refuse an `output_dir` that names no folder (`.`, `..`, `/`); and, only while `NBTUNE_WORKSPACE` is
    set, one that leaves the workspace: `..`, or a path (absolute, or through a symlink) that resolves
    outside it. Whether the folder may be written (new, empty, or an earlier save) is decided when saving."""
    path = Path(output_dir).expanduser()
    if not path.name or path.name in (".", ".."):
        raise ConfigError(f"`output_dir` {str(output_dir)!r} names no folder to save into; give one, e.g. "
                          "'runs/my-run' or '~/runs/my-run'.", field="output_dir")
    roots = workspace_roots()
    if not roots:
        return
    allowed = ", ".join(str(root) for root in roots)
    if ".." in path.parts:
        raise ConfigError(f"`output_dir` {str(output_dir)!r} contains '..', which NBTUNE_WORKSPACE does not "
                          f"allow; give a folder inside {allowed}.", field="output_dir")
    resolved = (Path.cwd() / path).resolve()  # follows symlinks, as a write would
    if not any(resolved.is_relative_to(root) for root in roots):
        raise ConfigError(f"`output_dir` {str(output_dir)!r} resolves to {resolved}, outside the workspace that "
                          f"NBTUNE_WORKSPACE confines output to ({allowed}); use a folder inside it, or add the "
                          "folder to NBTUNE_WORKSPACE before starting the kernel.", field="output_dir")


def check_loadable_folder(folder: str | Path, *, what: str = "folder") -> None:
    """Refuse a model/adapter folder whose weights are pickles or whose safetensors header is hostile."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    weights = [p for p in folder.iterdir() if p.is_file()]
    tensors = [p for p in weights if p.suffix == ".safetensors"]
    pickles = [p.name for p in weights if p.suffix in PICKLE_SUFFIXES and p.name != "training_args.bin"]
    if pickles and not tensors:
        raise NbtuneError(f"{what} {str(folder)!r} holds weights only as pickle files ({', '.join(sorted(pickles))}); "
                          "loading them could run code. Convert them to safetensors first (load them yourself, "
                          "if you trust them, and save_pretrained(..., safe_serialization=True)).")
    for path in tensors:
        check_safetensors_header(path)


def check_safetensors_header(path: str | Path) -> None:
    """A safetensors file starts with an 8-byte little-endian header length and a JSON header: refuse a
    length beyond the file or the limit, and a header that is not a JSON object (before any parser sees it)."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise NbtuneError(f"{path.name} is not a safetensors file (only {size} bytes).")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_SAFETENSORS_HEADER or length > size - 8:
            raise NbtuneError(f"{path.name} claims a {length:,}-byte safetensors header in a {size:,}-byte file; "
                              "refusing to read it (damaged or hostile).")
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise NbtuneError(f"{path.name} has no valid safetensors header; refusing to read it.")


__all__ = ["check_loadable_folder", "check_output_dir", "check_safetensors_header", "workspace_roots"]
