"""Atomic directory writes: a reader sees the old folder or the complete new one, never half of one."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nbtune.errors import NbtuneError


@contextlib.contextmanager
def atomic_directory(target: Path, *, replaceable: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of `target`; on success it replaces `target` by rename.

    With `replaceable` set, an existing `target` is only replaced if it holds that file (a run.json,
    say): a typo in `output_dir` must never wipe out a folder of the user's own files.
    """
    target = Path(target).expanduser()
    if not target.name or target.name in (".", ".."):
        raise NbtuneError(f"cannot save into {str(target)!r}: give a folder name, e.g. 'runs/my-run'.",
                          field="output_dir")
    if target.exists() and (not target.is_dir() or (replaceable and not (target / replaceable).exists())):
        raise NbtuneError(f"{str(target)!r} exists and is not a saved run; choose another `output_dir` "
                          "(nbtune only replaces folders it wrote).", field="output_dir")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like any new folder
    try:
        yield tmp
        old = None
        if target.exists():
            # os.replace cannot replace a non-empty directory: move the old one aside first.
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:
            if old is not None:
                os.replace(old, target)  # put the previous save back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n", encoding="utf-8")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return repr(value)
