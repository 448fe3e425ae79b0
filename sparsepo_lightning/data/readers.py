"""Read preference rows from JSONL / JSON / Parquet files or hub datasets: one iterator per source kind, each
yielding :class:`~sparsepo_lightning.data.rows.RawRow` (a location such as ``data/x.jsonl:12`` plus the decoded
value); nothing else differs between sources. Validation is in :mod:`sparsepo_lightning.data.validate`."""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sparsepo_lightning.data.rows import RawRow
from sparsepo_lightning.errors import ConfigError, DataError, MissingFileError

_JSON_LIST_KEYS = ("data", "train")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def iter_jsonl(path: str | Path) -> Iterator[RawRow]:
    """Rows of a JSON-lines file, one per non-blank line, located as ``path:line``.

    A line that is not UTF-8, not JSON, or nested too deeply to decode is one ``bad_json`` row; the other lines
    are still read.
    """
    with open(path, "rb") as f:  # bytes: one undecodable line must not stop the whole file
        for line_no, raw in enumerate(f, start=1):
            location = f"{path}:{line_no}"
            try:
                line = (raw.removeprefix(codecs.BOM_UTF8) if line_no == 1 else raw).decode("utf-8")
            except UnicodeDecodeError as e:
                yield RawRow(location, decode_error=f"not valid UTF-8 (byte {raw[e.start : e.start + 1]!r} at "
                                                    f"character {e.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                yield RawRow(location, json.loads(line))
            except json.JSONDecodeError as e:
                yield RawRow(location, decode_error=f"{e.msg} at character {e.pos + 1}")
            except RecursionError:
                yield RawRow(location, decode_error="nested too deeply to decode")


def iter_json(path: str | Path) -> Iterator[RawRow]:
    """Rows of a JSON file holding a list of rows, or ``{"data": [...]}`` / ``{"train": [...]}``.

    Each row is located by the line on which its object starts (``path:line``). A syntax error makes the
    whole file unreadable; it is reported as one ``bad_json`` row at the line JSON's decoder names.
    """
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        yield RawRow(f"{path}:{line}", decode_error="not valid UTF-8 (the whole file is unreadable)")
        return
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        yield RawRow(f"{path}:{e.lineno}", decode_error=f"column {e.colno}: {e.msg} (the whole file is unreadable)")
        return
    except RecursionError:
        yield RawRow(f"{path}:1", decode_error="nested too deeply to decode (the whole file is unreadable)")
        return
    rows, start = _json_row_list(document, text, path)
    lines = _json_row_lines(text, start, len(rows))
    for index, value in enumerate(rows):
        yield RawRow(f"{path}:{lines[index]}" if lines else f"{path}#{index}", value)


def _json_row_list(document: Any, text: str, path: str | Path) -> tuple[list[Any], int | None]:
    """The list of rows in a parsed JSON document and the character offset of its ``[`` (if found)."""
    if isinstance(document, list):
        return document, text.index("[")
    if isinstance(document, dict):
        for key in _JSON_LIST_KEYS:
            if isinstance(document.get(key), list):
                match = re.search(r'"' + key + r'"\s*:\s*\[', text)
                return document[key], None if match is None else match.end() - 1
    keys = sorted(document) if isinstance(document, dict) else None
    raise DataError(
        f"{path}: expected a JSON list of rows or an object with a 'data' or 'train' list, "
        f"got {type(document).__name__} (keys {keys}). "
        'Fix: store the rows as a top-level list or as {"data": [...]}, or convert the file to JSONL.'
    )


def _json_row_lines(text: str, start: int | None, count: int) -> list[int] | None:
    """1-based line on which each element of the JSON array at ``text[start] == '['`` begins.

    Returns ``None`` when the positions cannot be recovered (rows are then named ``path#index``).
    """
    if start is None:
        return None
    decoder = json.JSONDecoder()
    space = re.compile(r"[ \t\n\r]*")
    index, lines = space.match(text, start + 1).end(), []
    try:
        while text[index] != "]":
            lines.append(text.count("\n", 0, index) + 1)
            _, index = decoder.raw_decode(text, index)
            index = space.match(text, index).end()
            if text[index] == ",":
                index = space.match(text, index + 1).end()
    except (ValueError, IndexError, RecursionError):
        return None
    return lines if len(lines) == count else None


def iter_parquet(path: str | Path, batch_rows: int = 1024) -> Iterator[RawRow]:
    """Rows of a Parquet file, located as ``path row N`` with N counted from 1."""
    import pyarrow.parquet as pq

    row_no = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
        for value in batch.to_pylist():
            row_no += 1
            yield RawRow(f"{path} row {row_no}", value)


def load_hub_split(name: str, config: str | None, split: str, **kwargs: Any) -> Any:
    """``datasets.load_dataset(name, config, split=split, **kwargs)`` with an error naming the options to fix.

    ``name`` may be a hub id (``Anthropic/hh-rlhf``) or a local folder in the same layout (how the task
    loaders are tested offline); ``kwargs`` are passed on (``data_dir``, ``data_files``, ``revision``...).
    """
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split, **kwargs)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(
            f"could not load hub dataset {name!r} (config {config!r}, split {split!r}, options {kwargs}): {e}. "
            "Fix: check hub_dataset / hub_config / hub_kwargs, and set train_split / val_split to splits that "
            "exist (val_split: null disables the hub validation split)."
        ) from e


def iter_hub(name: str, config: str | None, split: str, **kwargs: Any) -> Iterator[RawRow]:
    """Rows of a hub dataset split, located as ``name[split]#index`` (0-based, as in ``dataset[index]``)."""
    for index, value in enumerate(load_hub_split(name, config, split, **kwargs)):
        yield RawRow(f"{name}[{split}]#{index}", value)


def iter_file(path: str | Path) -> Iterator[RawRow]:
    """Dispatch on the suffix: ``.jsonl``, ``.json`` or ``.parquet``."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"data file {str(path)!r} does not exist. Fix: check train_file/val_file/test_file.")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return iter_jsonl(path)
    if suffix == ".json":
        return iter_json(path)
    if suffix == ".parquet":
        return iter_parquet(path)
    raise ConfigError(
        f"{path}: unsupported file type {suffix!r}. Fix: use one of {', '.join(_FILE_SUFFIXES)}, "
        "or load it with `datasets` and pass a hub_dataset name."
    )
