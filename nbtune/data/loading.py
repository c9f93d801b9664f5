"""Turning whatever the user gives as `data` into a `datasets.Dataset`.

Accepted: 'demo'; a local .jsonl/.json/.csv/.parquet file; a list of dicts; a pandas DataFrame; a
`datasets.Dataset` (or a DatasetDict, whose 'train' split is used); a hub dataset name when the hub can
be reached. Failures are `DataError`s naming the config key (`data` or `eval_data`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nbtune.errors import DataError

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_records(source: Any, *, field: str = "data", split: str = "train") -> Any:
    """A non-empty `datasets.Dataset` from `source`; `split` picks the demo split ('train' or 'test')."""
    import datasets

    if isinstance(source, datasets.DatasetDict):
        source = _train_split(source, field)
    if isinstance(source, datasets.Dataset):
        dataset = source
    elif isinstance(source, (str, Path)):
        dataset = _from_name(str(source), field, split)
    elif isinstance(source, list):
        dataset = _from_list(source, field)
    elif _is_dataframe(source):
        dataset = datasets.Dataset.from_pandas(source, preserve_index=False)
    else:
        raise DataError(
            f"`{field}` is a {type(source).__name__}; give 'demo', a file path, a list of dicts, "
            "a pandas DataFrame or a datasets.Dataset.",
            field=field,
        )
    if len(dataset) == 0:
        raise DataError(f"`{field}` has no examples; it needs at least one row.", field=field)
    return dataset


def source_key(source: Any) -> str | None:
    """A stable identity for data named by a string (demo, a file as it is now, a hub name); None for
    in-memory data, whose contents nbtune cannot cheaply tell apart."""
    if not isinstance(source, (str, Path)):
        return None
    path = Path(source).expanduser()
    if path.is_file():
        stat = path.stat()
        return f"{path.resolve()}:{stat.st_mtime_ns}:{stat.st_size}"
    return str(source)


def _from_name(text: str, field: str, split: str) -> Any:
    import datasets

    if text == "demo":
        from nbtune.data.demo import demo_splits

        train, test = demo_splits()
        return datasets.Dataset.from_list(train if split == "train" else test)
    path = Path(text).expanduser()
    suffix = path.suffix.lower()
    if suffix in _BUILDERS:
        if not path.is_file():
            raise DataError(f"`{field}` file {text!r} does not exist (looked in {Path.cwd()}).", field=field)
        return _read_file(path, _BUILDERS[suffix], field)
    if path.exists():
        raise DataError(
            f"`{field}` {text!r} has suffix {suffix or '(none)'}; use .jsonl, .json, .csv or .parquet.",
            field=field,
        )
    return _from_hub(text, field)


def _read_file(path: Path, builder: str, field: str) -> Any:
    import datasets

    if builder == "json":
        return _read_json(path, field)
    if builder == "csv":
        return _read_csv(path, field)
    try:
        with quiet_datasets():
            return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # the builders raise many types; the user needs the file and the reason
        raise DataError(f"`{field}` file {str(path)!r} could not be read as {builder}: {_reason(exc)}",
                        field=field) from None


def _read_json(path: Path, field: str) -> Any:
    # Not datasets' json builder: its pyarrow reader turns ISO-date strings into timestamps, so an
    # answer "1987-08-03" would train as "1987-08-03 00:00:00". Python's json keeps strings strings.
    import datasets

    try:
        text = path.read_text(encoding="utf-8")
        rows = _json_lines(text, path, field) if path.suffix.lower() == ".jsonl" else json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"`{field}` file {str(path)!r} is not valid JSON: {exc}", field=field) from None
    if isinstance(rows, dict) and rows and all(isinstance(v, list) for v in rows.values()):
        return _checked(datasets.Dataset.from_dict, rows, path, field)  # columns: {"prompt": [...], ...}
    if isinstance(rows, list):
        return _from_list(rows, field) if rows else datasets.Dataset.from_list([])
    raise DataError(f"`{field}` file {str(path)!r} must hold a list of objects (or JSON lines).", field=field)


def _json_lines(text: str, path: Path, field: str) -> list[Any]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as exc:  # json's own position is within the line: name the file's line
            raise DataError(f"`{field}` file {str(path)!r} is not valid JSON at line {number} of the file: {exc}",
                            field=field) from None
    return rows


def _read_csv(path: Path, field: str) -> Any:
    # Every cell as the text it is: type inference would turn an answer "007" into 7 and "1.50" into 1.5,
    # and an empty cell into NaN.
    import datasets
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas' parser errors name the line; the user needs the file and the reason
        raise DataError(f"`{field}` file {str(path)!r} could not be read as csv: {_reason(exc)}",
                        field=field) from None
    return datasets.Dataset.from_pandas(frame, preserve_index=False)


def _checked(build: Any, rows: Any, path: Path, field: str) -> Any:
    try:
        return build(rows)
    except Exception as exc:  # pyarrow's complaints about ragged or mixed columns
        raise DataError(f"`{field}` file {str(path)!r} has inconsistent columns: {exc}", field=field) from None


def _from_hub(name: str, field: str) -> Any:
    import datasets

    try:
        with quiet_datasets():
            loaded = datasets.load_dataset(name, split="train")
    except Exception as exc:  # offline, unknown name, gated: all one answer for the user
        raise DataError(
            f"`{field}` {name!r} is not a local file and could not be loaded from the dataset hub "
            f"({_reason(exc)}). "
            "Give a .jsonl/.json/.csv/.parquet path, a DataFrame or a list of dicts.",
            field=field,
        ) from None
    return loaded


def _from_list(rows: list[Any], field: str) -> Any:
    import datasets

    if not rows:
        raise DataError(f"`{field}` is an empty list; it needs at least one example.", field=field)
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
    if bad is not None:
        raise DataError(
            f"`{field}` item {bad} is a {type(rows[bad]).__name__}; every item must be a dict such as "
            "{'prompt': ..., 'completion': ...}.",
            field=field,
        )
    # Every column any row has: `Dataset.from_list` takes the first row's keys only, so an optional column
    # (alpaca's `input`, a `system` turn) that the first row lacks was dropped from every row.
    columns = list(dict.fromkeys(key for row in rows for key in row))
    if any(len(row) != len(columns) for row in rows):
        rows = [{key: row.get(key) for key in columns} for row in rows]
    try:
        return datasets.Dataset.from_list(rows)
    except Exception as exc:  # pyarrow cannot build one column from mixed types
        raise DataError(f"`{field}` rows do not share one shape per column: {exc}", field=field) from None


def _train_split(dataset_dict: Any, field: str) -> Any:
    if "train" in dataset_dict:
        return dataset_dict["train"]
    raise DataError(
        f"`{field}` is a DatasetDict without a 'train' split (it has {', '.join(dataset_dict)}); pass one split.",
        field=field,
    )


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """No `datasets` progress bars inside the block (one per map/filter/split is noise in a cell)."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _reason(exc: Exception) -> str:
    """The first line of an exception's message, short enough for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _is_dataframe(obj: Any) -> bool:
    # Duck-typed so that pandas stays optional.
    return type(obj).__name__ == "DataFrame" and hasattr(obj, "columns") and hasattr(obj, "to_dict")
