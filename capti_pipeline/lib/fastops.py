"""Vectorised helpers for pyarrow-backed string columns where pandas is slow.

pandas 3's ``Series.isin`` on a ``str`` (pyarrow) column boxes every lookup value into a pyarrow
scalar one at a time (about 7 µs each: 4 s for 600 000 ids); :func:`isin` hands the whole value set
to ``pyarrow.compute.is_in`` instead. Results are identical to ``Series.isin``.
"""

from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc


def _arrow(values: object) -> pa.Array | pa.ChunkedArray | None:
    """The pyarrow strings behind a str Series/Index/array, or None when it is not one."""
    if isinstance(values, pd.Series | pd.Index):
        values = values.array
    if isinstance(values, pd.api.extensions.ExtensionArray) and hasattr(values, "__arrow_array__"):
        arr = pa.array(values)
        if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
            return arr
    return None


def _value_set(values: Iterable[object], type_: pa.DataType) -> pa.Array | None:
    arrow = _arrow(values)
    if arrow is not None:
        combined = arrow.combine_chunks() if isinstance(arrow, pa.ChunkedArray) else arrow
        return combined.cast(type_)
    items = values if isinstance(values, list | tuple | np.ndarray) else list(values)
    try:
        return pa.array(items, type=type_, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None  # not all strings: let pandas decide


def isin(series: pd.Series, values: Iterable[object]) -> pd.Series:
    """``series.isin(values)`` (bool Series on the same index), fast for str columns."""
    arrow = _arrow(series)
    if arrow is None:
        return series.isin(values if not isinstance(values, set | frozenset) else list(values))
    value_set = _value_set(values, arrow.type)
    if value_set is None:
        return series.isin(list(values))
    if len(value_set) == 0:
        return pd.Series(np.zeros(len(series), dtype=bool), index=series.index, name=series.name)
    found = pc.fill_null(pc.is_in(arrow, value_set=value_set), False)
    return pd.Series(
        found.to_numpy(zero_copy_only=False), index=series.index, name=series.name, dtype=bool
    )


# ------------------------------------------------------------------------------------------------
# 64-bit fingerprints of strings, for exact matching of millions of ids
# ------------------------------------------------------------------------------------------------
#
# A uniqueness check of six million 40-byte ids through Arrow's (or pandas') generic hash table
# takes 2-5 s; fingerprinting them eight bytes at a time with numpy and looking for repeated
# integers takes under 1.5 s. A fingerprint is only a shortcut: equal strings always have equal
# fingerprints, and repeats are confirmed on the strings themselves, so results are exact.

_MIX = np.uint64(0x9E3779B97F4A7C15)
_MIX2 = np.uint64(0xBF58476D1CE4E5B9)


def _string_chunks(values: pd.Series | pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    arrow = _arrow(values) if isinstance(values, pd.Series | pd.Index) else values
    if arrow is None:
        arrow = pa.array(values.astype("str").array)  # type: ignore[union-attr]
    chunks = arrow.chunks if isinstance(arrow, pa.ChunkedArray) else [arrow]
    return [
        c.cast(pa.large_string()) if not pa.types.is_large_string(c.type) else c for c in chunks
    ]


def string_fingerprints(values: pd.Series | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """uint64 fingerprint per string (nulls fingerprint like the empty string)."""
    parts = [_chunk_fingerprints(chunk) for chunk in _string_chunks(values)]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)


def _chunk_fingerprints(chunk: pa.Array) -> np.ndarray:
    n = len(chunk)
    if n == 0:
        return np.empty(0, dtype=np.uint64)
    _validity, offsets_buffer, data_buffer = chunk.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int64)[chunk.offset : chunk.offset + n + 1]
    starts = offsets[:-1]
    lengths = offsets[1:] - starts
    if chunk.null_count:
        lengths = np.where(chunk.is_null().to_numpy(zero_copy_only=False), 0, lengths)
    end = int(offsets[-1])
    # Eight readable bytes past every string's start: a zero-padded copy of the used bytes.
    padded = np.zeros(end + 8, dtype=np.uint8)
    if data_buffer is not None and end:
        padded[:end] = np.frombuffer(data_buffer, dtype=np.uint8, count=end)
    words = np.ndarray(shape=(end + 1,), dtype="<u8", buffer=padded, strides=(1,))
    fingerprint = (lengths.astype(np.uint64) + np.uint64(1)) * _MIX
    longest = int(lengths.max())
    rows: np.ndarray | slice = slice(None)
    for k in range(0, longest, 8):
        if k and not (lengths > k).all():
            rows = np.flatnonzero(lengths > k)
        left = lengths[rows] - k
        word = words[starts[rows] + k]
        short = left < 8
        if short.any():
            keep = np.left_shift(np.uint64(1), (left[short] * 8).astype(np.uint64)) - np.uint64(1)
            word[short] &= keep
        mixed = (fingerprint[rows] ^ word) * _MIX2
        fingerprint[rows] = mixed ^ (mixed >> np.uint64(31))
    return fingerprint


def duplicated(series: pd.Series) -> pd.Series:
    """``series.duplicated(keep=False)`` for str columns (every row of a repeated value)."""
    prints = string_fingerprints(series)
    out = np.zeros(len(series), dtype=bool)
    ordered = np.sort(prints, kind="stable")  # radix sort: no repeat is the common answer
    if not (ordered[1:] == ordered[:-1]).any():
        return pd.Series(out, index=series.index, name=series.name)
    marks = pd.Series(prints).duplicated(keep=False).to_numpy()
    if marks.any():  # confirm on the strings themselves (a fingerprint may collide)
        candidates = series[marks]
        out[np.flatnonzero(marks)] = candidates.duplicated(keep=False).to_numpy()
    return pd.Series(out, index=series.index, name=series.name)


def map_distinct(series: pd.Series, func: Callable[[str], str]) -> pd.Series:
    """``series.map(func)`` for a str column with few distinct values (statuses, vocabularies):
    `func` runs once per distinct value; the column is returned as is when nothing changes."""
    arrow = _arrow(series)
    if arrow is None:
        return series.map(func).astype("str")
    distinct = pc.unique(arrow)
    before = distinct.to_pylist()
    after = [func(v) if v is not None else v for v in before]
    if after == before:
        return series
    codes = pc.index_in(arrow, value_set=distinct)
    mapped = pc.take(pa.array(after, type=distinct.type), codes)
    return pd.Series(
        pd.array(mapped, dtype=series.dtype), index=series.index, name=series.name, copy=False
    )


def sort_order(*columns: pd.Series) -> np.ndarray:
    """Positions that sort rows by str columns (byte order, first column first), through
    Arrow's sort."""
    arrays = [_arrow(column) for column in columns]
    if any(array is None for array in arrays):
        frame = pd.DataFrame({i: c.to_numpy(dtype=object) for i, c in enumerate(columns)})
        return np.lexsort([frame[i] for i in reversed(frame.columns)])
    table = pa.table({str(i): array for i, array in enumerate(arrays)})
    keys = [(str(i), "ascending") for i in range(len(arrays))]
    return pc.sort_indices(table, sort_keys=keys).to_numpy(zero_copy_only=False)
