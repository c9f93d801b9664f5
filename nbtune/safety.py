"""What nbtune refuses by default when a config or a folder comes from someone else.

A config file or a saved run downloaded from the internet must not be able to write outside the
workspace, run code, or unpickle objects. Here: the workspace rule for `output_dir`, and the checks on
folders before anything is loaded from them (no pickle weights, sane safetensors headers).
`trust_remote_code` is a per-run setting (`RunConfig.trust_remote_code`, default false).
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
    """Where runs may write: the current folder (the notebook's), plus any folders listed in the
    environment variable `NBTUNE_WORKSPACE` (os.pathsep-separated), set by whoever runs the kernel."""
    extra = [Path(p).expanduser().resolve() for p in os.environ.get("NBTUNE_WORKSPACE", "").split(os.pathsep) if p]
    return [Path.cwd().resolve(), *extra]


def check_output_dir(output_dir: str | Path) -> None:
    """Refuse an output folder that leaves the workspace: `..`, or a path (absolute, or through a symlink)
    that resolves outside it."""
    path = Path(output_dir).expanduser()
    roots = workspace_roots()
    if ".." in path.parts:
        raise ConfigError(f"`output_dir` {str(output_dir)!r} contains '..'; give a folder inside the workspace "
                          f"({roots[0]}).", field="output_dir")
    resolved = (Path.cwd() / path).resolve()  # follows symlinks, as a write would
    if not any(resolved.is_relative_to(root) for root in roots):
        raise ConfigError(f"`output_dir` {str(output_dir)!r} resolves to {resolved}, outside the workspace "
                          f"{roots[0]}; use a folder inside it, or add the folder to the environment variable "
                          "NBTUNE_WORKSPACE before starting the kernel.", field="output_dir")


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
