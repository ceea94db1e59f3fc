"""Step outputs on disk, written and read back without copying their data.

A district's validated frames are over a gigabyte at a million students. Pickling them the
ordinary way copies every column into the pickle stream (and pandas first glues each pyarrow
column into one chunk); reading them back copies it all again. Here the pickle stream keeps only
the objects' structure: every data buffer (numpy arrays, Arrow buffers) goes *out of band*
(pickle protocol 5) into the same file, 64-byte aligned, and loading memory-maps the file so the
restored frames point straight into the page cache. Files are owner-only and written atomically,
since they hold personal data.

Writing a gigabyte still takes seconds, so :class:`Handoff` writes big outputs in a background
thread while the next step runs, and gives a consumer in the same process the object itself.
Each file records the run that wrote it, and a consumer names the run it expects: an output
overwritten by a later run, or never completely written, is an error, never stale data.

Layout: MAGIC, buffer count, stream length and run-id length (u64 each), the buffer lengths (u64
each), the run id, the pickle stream, then the buffers.
"""

import io
import mmap
import os
import pickle
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
from pandas.core.arrays.arrow.array import ArrowExtensionArray

MAGIC = b"CAPTISG2"
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


class StagingError(Exception):
    """A staged output is missing, foreign, or not the one the consumer expects."""


def dump(obj: Any, path: Path, *, run_id: str = "") -> None:
    """Write `obj` to `path` (0600, atomically), recording the run that wrote it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    buffers: list[pickle.PickleBuffer] = []
    stream = _stream(obj, buffers)
    raws = [buffer.raw() for buffer in buffers]
    run = run_id.encode()
    header = struct.pack(
        f"<8sQQQ{len(raws)}Q", MAGIC, len(raws), len(stream), len(run), *(r.nbytes for r in raws)
    )
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            position = _write(handle, header, 0)
            position = _write(handle, run, position)
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


def load(path: Path, *, run_id: str | None = None) -> Any:
    """Read an object written by :func:`dump`; its data stays in the (private) file mapping.
    With `run_id`, the file must have been written by that run."""
    try:
        handle = path.open("rb")
    except FileNotFoundError as exc:
        raise StagingError(f"no staged output at {path}") from exc
    with handle:
        if os.fstat(handle.fileno()).st_size < 32:
            raise StagingError(f"{path} is not a staging file")
        # Copy-on-write: restored arrays are writable without touching the file.
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    view = memoryview(mapped)
    magic, count, stream_length, run_length = struct.unpack_from("<8sQQQ", view, 0)
    if magic != MAGIC:
        raise StagingError(f"{path} is not a staging file")
    lengths = struct.unpack_from(f"<{count}Q", view, 32)
    position = 32 + 8 * count
    written_by = bytes(view[position : position + run_length]).decode()
    if run_id is not None and written_by != run_id:
        raise StagingError(
            f"{path} holds the output of run {written_by or '?'}, not of run {run_id} "
            "(replaced by a later run, or never completely written): run the partition again"
        )
    position += run_length
    stream = view[position : position + stream_length]
    position += stream_length
    parts = []
    for length in lengths:
        position += -position % _ALIGN
        parts.append(view[position : position + length])
        position += length
    return pickle.loads(stream, buffers=parts)


# Staged outputs kept per asset and partition: the latest runs' (older ones are removed).
KEEP_RUNS = 3


def run_file(folder: Path, run_id: str | None) -> Path:
    """The staged output of `run_id` in `folder`; without a run id, the newest one."""
    if run_id:
        return folder / f"{run_id}.stg"
    files = sorted(folder.glob("*.stg"), key=lambda p: p.stat().st_mtime) if folder.exists() else []
    if not files:
        raise StagingError(f"no staged output in {folder}")
    return files[-1]


def prune(folder: Path, keep: int = KEEP_RUNS) -> None:
    """Remove all but the newest `keep` staged outputs of a folder (they hold personal data)."""
    files = sorted(folder.glob("*.stg"), key=lambda p: p.stat().st_mtime)
    for old in files[:-keep] if keep > 0 else files:
        old.unlink(missing_ok=True)


# Outputs smaller than this are written at once (the run's last, small, output included, so a
# run ends with every output on disk and any write error raised in it).
BACKGROUND_BYTES = 64 * 1024 * 1024


@dataclass
class _Write:
    run_id: str
    obj: Any
    thread: threading.Thread | None = None
    error: BaseException | None = None


class Handoff:
    """Outputs written in the background while the next step computes (one write in flight),
    and handed over in memory to consumers in the same process."""

    def __init__(self) -> None:
        self._writes: dict[Path, _Write] = {}
        self._lock = threading.Lock()

    def put(self, path: Path, obj: Any, run_id: str) -> None:
        self.finish()
        if _buffer_bytes(obj) < BACKGROUND_BYTES:
            dump(obj, path, run_id=run_id)
            prune(path.parent)
            return
        write = _Write(run_id, obj)
        # Not a daemon: the process waits for the file before it exits.
        write.thread = threading.Thread(
            target=self._write, args=(write, path), name=f"staging {path.name}"
        )
        with self._lock:
            self._writes[path] = write
        write.thread.start()

    @staticmethod
    def _write(write: _Write, path: Path) -> None:
        try:
            dump(write.obj, path, run_id=write.run_id)
            prune(path.parent)  # (removing gigabytes takes a while: off the step's path too)
        except BaseException as exc:  # raised by the next put() or finish()
            write.error = exc

    def get(self, path: Path, run_id: str | None) -> Any:
        with self._lock:
            write = self._writes.get(path)
        if write is not None and (run_id is None or write.run_id == run_id):
            return write.obj
        return load(path, run_id=run_id)

    def finish(self) -> None:
        """Wait for every write; raise the first that failed."""
        with self._lock:
            writes, self._writes = dict(self._writes), {}
        for write in writes.values():
            if write.thread is not None:
                write.thread.join()
        for write in writes.values():
            if write.error is not None:
                raise write.error


def _buffer_bytes(obj: Any) -> int:
    """Roughly how many data bytes `obj` holds (its DataFrames), without serialising it."""
    frames: list[pd.DataFrame] = []
    _collect_frames(obj, frames, depth=0)
    return sum(int(frame.memory_usage(index=False, deep=False).sum()) for frame in frames)


def _collect_frames(obj: Any, frames: list[pd.DataFrame], depth: int) -> None:
    if depth > 3:
        return
    if isinstance(obj, pd.DataFrame):
        frames.append(obj)
    elif isinstance(obj, dict):
        for value in obj.values():
            _collect_frames(value, frames, depth + 1)
    elif hasattr(obj, "__dataclass_fields__"):
        for name in obj.__dataclass_fields__:
            _collect_frames(getattr(obj, name, None), frames, depth + 1)
