"""Safe directory writes: a reader sees the old folder or the complete new one, never half of one, and
nothing nbtune did not write is ever overwritten or deleted.

A save goes to a new folder, into an existing empty one (one the user made, `tempfile.mkdtemp()`'s, a
mount point), or over an earlier save of nbtune's; a folder holding anything else, a file, or a symlink
in the folder's place is refused (`check_target`).

    >>> with atomic_directory(Path("runs/demo"), replaceable="run.json") as tmp:  # doctest: +SKIP
    ...     write_json(tmp / "run.json", {"name": "demo"})
"""

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

# The hidden folder a save into an existing empty folder writes in first; one a killed process left
# behind does not make the folder "hold files".
_INSIDE_TMP = ".nbtune-tmp-"


def check_target(target: Path, *, replaceable: str | None = None, field: str = "output_dir") -> None:
    """Refuse to save to `target` unless it is new, an empty folder, or a folder nbtune may replace: with
    `replaceable` (a run.json, say), one that holds that file, so a typo in `output_dir` never wipes out a
    folder of the user's own files; without it, any folder (nbtune's own cache). A symlink where the
    folder would be is refused: nbtune never saves through one into a folder elsewhere."""
    target = Path(target).expanduser()
    shown = str(target)
    if not target.name or target.name in (".", ".."):
        raise NbtuneError(f"`{field}` {shown!r} names no folder to save into; give one, e.g. 'runs/my-run'.",
                          field=field)
    if target.is_symlink():
        raise NbtuneError(f"`{field}` {shown!r} is a symlink (to {os.readlink(target)}); nbtune does not save "
                          "through one: give the folder it points to, or a new folder.", field=field)
    if not target.exists():
        return
    if not target.is_dir():
        raise NbtuneError(f"`{field}` {shown!r} is a file; give a folder (nbtune never overwrites what it did "
                          "not write).", field=field)
    if replaceable is not None and _holds_anything(target) and not _marker(target / replaceable):
        raise NbtuneError(f"`{field}` {shown!r} already holds files nbtune did not write, and nbtune never "
                          f"overwrites them; give a new or empty folder, e.g. {str(target / 'my-run')!r}.",
                          field=field)


def check_run_folder(target: Path, name: str) -> None:
    """Before a run loads anything: refuse the folder it would save into when saving there would fail or
    destroy something (a folder of the user's files, a sweep's study and trials), rather than after training."""
    target = Path(target).expanduser()
    if target.is_dir() and not (target / "run.json").exists() and _holds_sweep(target):
        raise NbtuneError(f"{str(target)!r} holds sweep {target.name!r} (its study and trials), which saving run "
                          f"{name!r} there would replace; give the run another name (or `output_dir`).",
                          field="name")
    check_target(target, replaceable="run.json")


def _holds_sweep(folder: Path) -> bool:
    """A sweep's folder: its Optuna study file, or trial folders that each hold a saved run."""
    return (folder / "study.db").is_file() or any(
        (child / "run.json").is_file() for child in folder.iterdir() if child.is_dir())


@contextlib.contextmanager
def atomic_directory(target: Path, *, replaceable: str | None = None, field: str = "output_dir") -> Iterator[Path]:
    """Yield a temporary folder; on success its files become `target`'s, all at once.

    A new `target`, or one replaced (see `check_target` for which), is the temporary sibling renamed into
    place. An existing empty `target` keeps being the folder it is (its permissions, the disk it is on):
    the files are written in a hidden folder inside it and moved up, `replaceable` last, so a folder
    that holds that file holds a complete save.
    """
    target = Path(target).expanduser()
    check_target(target, replaceable=replaceable, field=field)
    if target.is_dir() and not _holds_anything(target):
        with _filled_in_place(target, last=replaceable, field=field) as tmp:
            yield tmp
        return
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
            shutil.rmtree(old, ignore_errors=True)  # never follows the symlinks a saved folder may hold
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _filled_in_place(target: Path, *, last: str | None, field: str) -> Iterator[Path]:
    # Written inside `target`, so moving the files up is a rename on one filesystem, even when `target` is
    # a mount point.
    tmp = Path(tempfile.mkdtemp(prefix=_INSIDE_TMP, dir=target))
    moved: list[Path] = []
    try:
        yield tmp
        if _holds_anything(target, besides=tmp):  # something else wrote there meanwhile: overwrite nothing
            raise NbtuneError(f"`{field}` {str(target)!r} got other files while nbtune saved into it; nothing was "
                              "saved. Give a new or empty folder.", field=field)
        for entry in sorted(tmp.iterdir(), key=lambda p: p.name == last):
            os.replace(entry, target / entry.name)
            moved.append(target / entry.name)
    except BaseException:
        for path in moved:  # ours: leave the folder empty, as it was
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _holds_anything(folder: Path, *, besides: Path | None = None) -> bool:
    return any(p != besides and not p.name.startswith(_INSIDE_TMP) for p in folder.iterdir())


def _marker(path: Path) -> bool:
    """Whether `path` is a file nbtune could have written: a regular file, not a symlink to one."""
    return path.is_file() and not path.is_symlink()


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
