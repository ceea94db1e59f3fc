"""Step outputs on disk, written and read back without copying their data.

A district's validated frames are over a gigabyte at a million students. Pickling them the
ordinary way copies every column into the pickle stream (and pandas first glues each pyarrow
column into one chunk); reading them back copies it all again. Here the pickle stream keeps only
the objects' structure: every data buffer (numpy arrays, Arrow buffers) goes *out of band*
(pickle protocol 5) into the same file, 64-byte aligned, and loading memory-maps the file so the
restored frames point straight into the page cache. Files are owner-only and written atomically,
since they hold personal data.

Layout: MAGIC, buffer count and stream length (u64 each), the buffer lengths (u64 each), the
pickle stream, then the buffers.
"""

import io
import mmap
import os
import pickle
import struct
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
from pandas.core.arrays.arrow.array import ArrowExtensionArray

MAGIC = b"CAPTISTG"
_ALIGN = 64


def _rebuild_arrow_extension_array(
    cls: type, state: dict[str, Any], chunks: list[pa.Array], type_: pa.DataType
) -> ArrowExtensionArray:
    array = cls.__new__(cls)
    array.__dict__.update(state)
    array._pa_array = pa.chunked_array(chunks, type=type_)
    return array


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        # pandas' own reduction of pyarrow-backed columns (the `str` dtype) first copies all of a
        # column's chunks into one; keep the chunks as they are.
        if isinstance(obj, ArrowExtensionArray):
            state = {k: v for k, v in obj.__dict__.items() if k not in ("_pa_array", "_cache")}
            state["_cache"] = {}
            chunked = obj._pa_array
            return (
                _rebuild_arrow_extension_array,
                (type(obj), state, list(chunked.chunks), chunked.type),
            )
        return NotImplemented


def dump(obj: Any, path: Path) -> None:
    """Write `obj` to `path` (0600, atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    buffers: list[pickle.PickleBuffer] = []
    stream = _stream(obj, buffers)
    raws = [buffer.raw() for buffer in buffers]
    header = struct.pack(
        f"<8sQQ{len(raws)}Q", MAGIC, len(raws), len(stream), *(r.nbytes for r in raws)
    )
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            position = _write(handle, header, 0)
            position = _write(handle, stream, position)
            for raw in raws:
                position = _write(handle, b"\0" * (-position % _ALIGN), position)
                position = _write(handle, raw, position)
        os.chmod(temp, 0o600)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _stream(obj: Any, buffers: list[pickle.PickleBuffer]) -> bytes:
    sink = io.BytesIO()
    _Pickler(sink, protocol=5, buffer_callback=buffers.append).dump(obj)
    return sink.getvalue()


def _write(handle: Any, data: bytes | memoryview, position: int) -> int:
    handle.write(data)
    return position + len(data)


def load(path: Path) -> Any:
    """Read an object written by :func:`dump`; its data stays in the (private) file mapping."""
    with path.open("rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            raise ValueError(f"{path} is empty")
        # Copy-on-write: restored arrays are writable without touching the file.
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    view = memoryview(mapped)
    magic, count, stream_length = struct.unpack_from("<8sQQ", view, 0)
    if magic != MAGIC:
        raise ValueError(f"{path} is not a staging file")
    lengths = struct.unpack_from(f"<{count}Q", view, 24)
    position = 24 + 8 * count
    stream = view[position : position + stream_length]
    position += stream_length
    parts = []
    for length in lengths:
        position += -position % _ALIGN
        parts.append(view[position : position + length])
        position += length
    return pickle.loads(stream, buffers=parts)
