"""Tokenised features as Arrow files: a split's feature dicts and row locations written into one Arrow stream file
(:func:`write_features`) and read back memory-mapped (:func:`read_features`) as a sequence of the same dicts
(:class:`CachedFeatures`). The storage of :mod:`sparsepo_lightning.data.token_cache`."""

from __future__ import annotations

import operator
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

Features = dict[str, Any]

SOURCE_COLUMN = "__source__"
"""The column of row locations (``file:line``) written beside the features."""


def write_features(path: Path, features: Sequence[Mapping[str, Any]], sources: list[str]) -> None:
    """Write one Arrow stream file: a column per feature key (null where a row lacks it; integer lists as int32
    when their values fit, half the size of int64), and the ``__source__`` column of row locations.

    Raises:
        ValueError, TypeError: (``pyarrow.ArrowInvalid`` / ``ArrowTypeError``) features Arrow cannot hold.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    keys = list(dict.fromkeys(key for feature in features for key in feature))
    if SOURCE_COLUMN in keys:
        raise ValueError(f"a feature is named {SOURCE_COLUMN!r}, the cache's column of row locations")
    columns = {}
    for key in keys:
        column = pa.array([feature.get(key) for feature in features])
        if pa.types.is_list(column.type) and pa.types.is_int64(column.type.value_type):
            bounds = pc.min_max(pc.list_flatten(column)).as_py()
            if bounds["min"] is None or (bounds["min"] >= -(2**31) and bounds["max"] < 2**31):
                column = column.cast(pa.list_(pa.int32()))
        columns[key] = column
    columns[SOURCE_COLUMN] = pa.array(sources, type=pa.string())
    table = pa.table(columns)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=1024)


def read_features(path: Path) -> tuple[CachedFeatures, list[str]]:
    """A file of :func:`write_features`, memory-mapped: ``(features, row locations)``."""
    import datasets

    dataset = datasets.Dataset.from_file(str(path))
    sources = dataset.data.column(SOURCE_COLUMN).to_pylist()
    return CachedFeatures(dataset.select_columns([c for c in dataset.column_names if c != SOURCE_COLUMN])), sources


class CachedFeatures(Sequence):
    """The features of one cached split, read from its memory-mapped Arrow file: ``dm.datasets[split]`` when the
    split came from (or went into) the cache.

    A read-only sequence of the dicts ``tokenize_fn`` returned (truncation counters removed): integer indexing,
    slices (lists), iteration (read in blocks), ``len``, and ``==`` with a list of dicts or another
    ``CachedFeatures``. A key a row did not have (the span weights of a pair without spans) is left out, as in the
    original dict. DataLoader workers receive it by file path, and all processes share the file's pages.

    Args:
        dataset: the split's ``datasets.Dataset`` (memory-mapped), without the ``__source__`` column.
    """

    __hash__ = None  # type: ignore[assignment]  # compares by content, like a list

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = operator.index(index)
        i += len(self) if i < 0 else 0
        if not 0 <= i < len(self):
            raise IndexError(f"CachedFeatures index {index} out of range for {len(self)} rows")
        return _present(self._table().slice(i, 1).to_pylist()[0])

    def __getitems__(self, indices: Sequence[int]) -> list[Features]:
        """Several rows in one read (``torch.utils.data`` fetches a batch this way)."""
        return [_present(row) for row in self._table().take([operator.index(i) for i in indices]).to_pylist()]

    def __iter__(self) -> Iterator[Features]:
        for block in self._table().to_batches(max_chunksize=1024):
            yield from map(_present, block.to_pylist())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    def __repr__(self) -> str:
        files = [f["filename"] for f in self.dataset.cache_files]
        return f"CachedFeatures({len(self)} rows, {files[0] if len(files) == 1 else files})"

    def _table(self) -> Any:
        return self.dataset.data.table  # the pyarrow table: row reads without the datasets formatter (~2x faster)


def _present(row: dict[str, Any]) -> Features:
    return {key: value for key, value in row.items() if value is not None}
