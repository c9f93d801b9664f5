"""Turning whatever the user gives as `data` into a `datasets.Dataset`.

Accepted: 'demo' (and 'demo_pairs', its preference pairs); a local .jsonl/.json/.csv/.parquet file; a list
of dicts; a pandas DataFrame; a `datasets.Dataset` (or a DatasetDict, whose 'train' split is used); a hub
dataset name when the hub can be reached. Failures are `DataError`s naming the config key (`data` or `eval_data`).

Columns come out named as the formats expect (`Question` becomes `question`; see `canonical_columns`), and
a column of a list, a DataFrame or JSON that mixes text with numbers holds them all as text, as a CSV does.
"""

from __future__ import annotations

import contextlib
import json
import numbers
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nbtune.data.formats import canonical_columns
from nbtune.errors import DataError

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


DEMOS = ("demo", "demo_pairs")  # the shipped task, as answers and as preference pairs


def is_demo(source: Any) -> bool:
    """Whether `data` names a shipped demo task (which brings its own held-out split)."""
    return isinstance(source, str) and source in DEMOS


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
        dataset = _from_frame(source, field)
    else:
        raise DataError(
            f"`{field}` is a {type(source).__name__}; give 'demo', a file path, a list of dicts, "
            "a pandas DataFrame or a datasets.Dataset.",
            field=field,
        )
    if len(dataset) == 0:
        raise DataError(f"`{field}` has no examples; it needs at least one row.", field=field)
    # Renamed here, where every source passes, so that everything downstream (the tokeniser reads
    # `text` itself) sees the names the formats use.
    renames = canonical_columns(dataset.column_names)
    return dataset.rename_columns(renames) if renames else dataset


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

    if text in DEMOS:
        from nbtune.data.demo import demo_pair_splits, demo_splits

        train, test = demo_splits() if text == "demo" else demo_pair_splits()
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
        columns = {name: _uniform(name, values, field) for name, values in rows.items()}
        return _checked(datasets.Dataset.from_dict, columns, path, field)  # columns: {"prompt": [...], ...}
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
    names = list(dict.fromkeys(key for row in rows for key in row))
    columns = {name: _uniform(name, [row.get(name) for row in rows], field) for name in names}
    try:
        return datasets.Dataset.from_dict(columns)
    except Exception as exc:  # pyarrow cannot build one column from mixed types
        raise DataError(f"`{field}` rows do not share one shape per column: {_reason(exc)}", field=field) from None


def _from_frame(frame: Any, field: str) -> Any:
    import datasets

    if not frame.columns.is_unique:
        twice = sorted({str(c) for c in frame.columns[frame.columns.duplicated()]})
        raise DataError(f"`{field}` DataFrame has column(s) {', '.join(twice)} more than once; rename them.",
                        field=field)
    fixed = {}
    for name in frame.columns:
        if str(frame[name].dtype) == "object":  # only object columns can hold mixed Python values
            values = frame[name].tolist()
            uniform = _uniform(name, values, field)
            if uniform is not values:
                fixed[name] = uniform
    if fixed:
        frame = frame.copy(deep=False)  # the caller's DataFrame stays as it was
        for name, values in fixed.items():
            frame[name] = values
    try:
        return datasets.Dataset.from_pandas(frame, preserve_index=False)
    except Exception as exc:  # pyarrow's refusals: the user needs a line, not its traceback
        raise DataError(f"`{field}` DataFrame could not be read: {_reason(exc)}", field=field) from None


_KIND_WORDS = {"text": "text", "number": "numbers", "bool": "true/false", "list": "lists", "dict": "objects"}
_KIND_WORD = {"text": "text", "number": "a number", "bool": "true/false", "list": "a list", "dict": "an object"}


def _kind(value: Any) -> str | None:
    """What sort of value this is for an Arrow column; None for a missing one."""
    if value is None or (isinstance(value, float) and value != value) or type(value).__name__ == "NAType":
        return None
    if isinstance(value, str):
        return "text"
    if type(value).__name__ in ("bool", "bool_"):
        return "bool"
    if isinstance(value, numbers.Number):
        return "number"
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ndarray":
        return "list"
    return "dict" if isinstance(value, dict) else type(value).__name__


def _uniform(name: Any, values: list[Any], field: str) -> list[Any]:
    """`values` as one Arrow column can hold them: numbers among text become text ('4' beside '2', as a CSV
    cell reads), since an answer column typed by hand often has both. A column mixing lists or objects
    with anything else is a `DataError` naming it. Returns `values` itself when nothing changes."""
    kinds = [_kind(v) for v in values]
    seen = list(dict.fromkeys(k for k in kinds if k is not None))
    if len(seen) < 2:
        return values
    if "text" in seen and set(seen) <= {"text", "number", "bool"}:
        return [v if k == "text" else None if k is None else str(v) for v, k in zip(values, kinds, strict=True)]
    if {"list", "dict"} & set(seen):
        first, other = (_KIND_WORDS.get(k, k) for k in seen[:2])
        row = kinds.index(seen[1])
        raise DataError(f"`{field}` column `{name}` mixes {first} and {other} (row {row} has "
                        f"{_KIND_WORD.get(seen[1], seen[1])}); give every row the same kind of value there.",
                        field=field)
    return values  # numbers with true/false, say: pyarrow decides, and a refusal is still a DataError


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
