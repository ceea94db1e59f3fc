"""The live roster state a delivery is compared with: per entity the sourcedIds, status and row
hash, plus the few fields deletion scope and duplicate checks need.

Scanning the roster tables costs a Python object per value (about 20 s for a district with six
million enrollments on SQLite), so every apply also records the state as a snapshot *in the same
transaction*: a full Arrow image per entity, then a small delta layer per apply, compacted
into a new full image once the deltas grow past a tenth of it. The snapshot is used only when its
head version equals the district's `roster_version`; anything else (a store written before
snapshots existed, a race with a concurrent apply) falls back to scanning the tables, which is
always correct. `apply.apply_plan` is the only writer of the roster tables, and it always
records its changes here.
"""

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from capti_pipeline.lib import store as st
from capti_pipeline.lib.fastops import isin

# Roster-name columns kept per entity besides sourcedId, status and row_hash.
STATE_COLUMNS: dict[str, tuple[str, ...]] = {
    "locations": ("type",),
    "users": ("username", "email", "identifier", "locations"),
    "classes": ("location",),
    # role too: with it an enrollment's state row is its whole before-image (the apply's ledger
    # takes it from the plan instead of reading thousands of rows back).
    "enrollments": ("class", "user", "role"),
}
_STORE_NAMES = {"class": "class_sourced_id", "user": "user_sourced_id"}
UPSERT, ARCHIVE, DELETE = "upsert", "archive", "delete"
_UPSERT_ACTIONS = ("create", "update", "restore", "revert")
# Compact into a new full image when the deltas since the last one exceed this share of it.
COMPACT_FRACTION = 0.10
_COMPACT_MIN_ROWS = 10_000
_PART_ROWS = 2_000_000  # rows per stored blob (bounded blob size, whatever the district size)


@dataclass
class StoreState:
    """The live roster of one district as frames keyed by sourcedId, plus its version."""

    version: int
    frames: dict[str, pd.DataFrame]

    def active_count(self, entity: str) -> int:
        return int(self.frames[entity]["status"].eq("active").sum())

    def active_ids(self, entity: str) -> pd.Series:
        frame = self.frames[entity]
        return frame["sourcedId"][frame["status"].eq("active")]


def columns_of(entity: str) -> list[str]:
    return ["sourcedId", "status", "row_hash", *STATE_COLUMNS[entity]]


def _normalised(entity: str, frame: pd.DataFrame) -> pd.DataFrame:
    """Exactly the state columns, as `str` and int64, on a fresh RangeIndex."""
    out = {}
    for column in columns_of(entity):
        values = frame[column]
        out[column] = (
            values.astype("int64")
            if column == "row_hash"
            else values
            if values.dtype == "str"
            else values.astype("str")
        )
    return pd.DataFrame(out).reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# Reading


def load_state(conn: Connection, district_id: str) -> StoreState:
    """The district's state at its current roster_version: from the snapshot when it is
    current, else by scanning the tables."""
    state = read_snapshot_state(conn, district_id)
    return state if state is not None else scan_state(conn, district_id)


def read_snapshot_state(conn: Connection, district_id: str) -> StoreState | None:
    """The state from a current snapshot, or None when there is none to trust."""
    for _attempt in range(2):  # a compaction committed between two reads: read again
        version, head = _versions(conn, district_id)
        if head is None or head["roster_version"] != version:
            return None
        frames = _read_snapshot(conn, district_id, head)
        if frames is not None:
            return StoreState(version, frames)
    return None


def load_state_and_backfill(engine: Engine, district_id: str) -> StoreState:
    """:func:`load_state`; a state that had to be scanned (a store from before snapshots, or a
    district with no apply since) is recorded as the snapshot, so the next run reads that."""
    with engine.connect() as conn:
        state = read_snapshot_state(conn, district_id)
        if state is not None:
            return state
        state = scan_state(conn, district_id)
    with engine.begin() as conn:
        # Lock the district row and keep the scan only if no apply committed since it began
        # (versions only grow): then every table it read was at that version.
        unchanged = conn.execute(
            st.districts.update()
            .where(
                st.districts.c.id == district_id,
                st.districts.c.roster_version == state.version,
            )
            .values(roster_version=state.version)
        ).rowcount
        if unchanged == 1:
            write_full(
                conn,
                district_id,
                state.version,
                {e: _normalised(e, f) for e, f in state.frames.items()},
            )
    return state


def _versions(conn: Connection, district_id: str) -> tuple[int, dict[str, Any] | None]:
    """The district's roster_version and its snapshot head, in one statement (consistent)."""
    d, h = st.districts, st.state_heads
    row = conn.execute(
        sa.select(d.c.roster_version, h.c.roster_version, h.c.full_version, h.c.full_rows)
        .select_from(d.outerjoin(h, h.c.district_id == d.c.id))
        .where(d.c.id == district_id)
    ).first()
    if row is None:
        raise st.UnknownDistrictError(f"district {district_id!r} is not registered")
    if row[1] is None:
        return int(row[0]), None
    head = {"roster_version": int(row[1]), "full_version": int(row[2]), "full_rows": int(row[3])}
    return int(row[0]), head


def scan_state(conn: Connection, district_id: str) -> StoreState:
    """The state read from the roster tables themselves (slow for big districts; always right)."""
    version = conn.execute(
        sa.select(st.districts.c.roster_version).where(st.districts.c.id == district_id)
    ).scalar()
    if version is None:
        raise st.UnknownDistrictError(f"district {district_id!r} is not registered")
    frames = {}
    for entity in st.ROSTER_TABLES:
        names = [_STORE_NAMES.get(c, c) for c in columns_of(entity)]
        names[0] = "sourced_id"
        frame = st.read_columns(conn, entity, district_id, names)
        frame.columns = columns_of(entity)
        frames[entity] = frame
    return StoreState(int(version), frames)


def _read_snapshot(
    conn: Connection, district_id: str, head: dict[str, Any]
) -> dict[str, pd.DataFrame] | None:
    layers = st.state_layers
    rows = conn.execute(
        sa.select(layers.c.roster_version, layers.c.entity, layers.c.kind, layers.c.data)
        .where(
            layers.c.district_id == district_id,
            layers.c.roster_version >= head["full_version"],
            layers.c.roster_version <= head["roster_version"],
        )
        .order_by(layers.c.roster_version, layers.c.entity, layers.c.part)
    ).all()
    full: dict[str, list[pd.DataFrame]] = {}
    deltas: dict[str, list[pd.DataFrame]] = {}
    for version, entity, kind, data in rows:
        try:
            frame = _decode(data)
        except (pa.ArrowException, OSError):  # unreadable (another format, damaged): rescan
            return None
        if not set(columns_of(entity)) <= set(frame.columns):  # an older layout: rescan
            return None
        if kind == "full" and version == head["full_version"]:
            full.setdefault(entity, []).append(frame)
        elif kind == "delta":
            deltas.setdefault(entity, []).append(frame)
    if set(full) != set(st.ROSTER_TABLES):
        return None  # compacted meanwhile (or never written): the caller reads again
    return {
        entity: apply_delta(_concat(parts), collapse(deltas.get(entity, [])))
        for entity, parts in full.items()
    }


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------------------------------
# Deltas


def delta_from_changes(entity: str, changes: pd.DataFrame) -> pd.DataFrame:
    """The state rows one entity's plan changes produce: upserts carry every state column and
    their new status; archives and deletes only the sourcedId."""
    changes = changes.reset_index(drop=True)
    action = changes["action"]
    upsert = isin(action.astype("str"), _UPSERT_ACTIONS).to_numpy()
    archive = action.eq("archive").to_numpy()
    status = _labels(np.where(upsert, 0, 1), ("active", ""))
    if "status" in changes.columns:  # undo's reverts restore the before-image status
        reverted = (action.eq("revert") & changes["status"].notna()).to_numpy()
        if reverted.any():
            status[reverted] = changes["status"][reverted].astype("str")
    frame = pd.DataFrame(
        {
            "sourcedId": _as_str(changes["sourcedId"]),
            "op": _labels(np.where(upsert, 0, np.where(archive, 1, 2)), (UPSERT, ARCHIVE, DELETE)),
            "status": status,
            "row_hash": changes["row_hash"].astype("Int64").fillna(0).astype("int64"),
        }
    )
    for column in STATE_COLUMNS[entity]:
        values = _as_str(changes[column])
        frame[column] = values if upsert.all() else values.where(upsert, "")
    return frame


def _labels(codes: np.ndarray, labels: tuple[str, ...]) -> pd.Series:
    """A `str` column of a few labels, built in Arrow (no Python string per row)."""
    dictionary = pa.DictionaryArray.from_arrays(pa.array(codes, type=pa.int8()), list(labels))
    return pd.Series(pd.array(dictionary.cast(pa.large_string()), dtype="str"))


def _as_str(values: pd.Series) -> pd.Series:
    """A `str` column (values as they are; missing values as empty strings)."""
    if values.dtype != "str":
        values = values.astype("object").where(values.notna(), "").astype("str")
    return values.fillna("") if values.hasnans else values


def collapse(deltas: list[pd.DataFrame]) -> pd.DataFrame | None:
    """Several deltas (oldest first) as one, at most one row per sourcedId: the last upsert or
    delete wins; a later archive turns an earlier upsert into an upsert with status archived."""
    deltas = [d for d in deltas if len(d)]
    if not deltas:
        return None
    if len(deltas) == 1:
        return deltas[0].drop_duplicates("sourcedId", keep="last")
    combined = pd.concat(deltas, ignore_index=True)
    last = combined.drop_duplicates("sourcedId", keep="last")
    archive = last["op"].eq(ARCHIVE)
    if not archive.any():
        return last.reset_index(drop=True)
    archived = last[archive]
    # The last non-archive op of an id whose last op is an archive came before that archive.
    earlier = combined[combined["op"].ne(ARCHIVE)].drop_duplicates("sourcedId", keep="last")
    earlier = earlier[isin(earlier["sourcedId"], archived["sourcedId"])]
    upserted = earlier[earlier["op"].eq(UPSERT)].assign(status="archived")
    plain = archived[~isin(archived["sourcedId"], upserted["sourcedId"])]
    deleted = isin(plain["sourcedId"], earlier["sourcedId"][earlier["op"].eq(DELETE)])
    plain = plain.assign(op=np.where(deleted.to_numpy(), DELETE, ARCHIVE))
    return pd.concat([last[~archive], upserted, plain], ignore_index=True)


def apply_delta(base: pd.DataFrame, delta: pd.DataFrame | None) -> pd.DataFrame:
    """`base` with a collapsed delta applied: rows it touches change in place, new rows are
    appended, deleted ones dropped. Only the columns that change are copied, so a delta of a
    few thousand rows over millions costs a fraction of a second."""
    if delta is None or delta.empty:
        return base
    delta = delta.reset_index(drop=True)
    if base.empty:  # a first import: the upserts are the state
        return (
            delta[delta["op"].eq(UPSERT)]
            .drop(columns="op")[list(base.columns)]
            .reset_index(drop=True)
        )
    merged = base.reset_index(drop=True)
    rows = np.flatnonzero(isin(merged["sourcedId"], delta["sourcedId"]).to_numpy())
    gone = np.zeros(len(merged), dtype=bool)
    if len(rows):
        # Each touched row's delta row (the delta is small: matching against it is cheap).
        which = pc.index_in(
            _arrow_strings(merged["sourcedId"].iloc[rows]),
            value_set=_arrow_strings(delta["sourcedId"]),
        ).to_numpy(zero_copy_only=False)
        changes = delta.iloc[which].reset_index(drop=True)
        op = changes["op"].to_numpy(dtype=object)
        upsert, archive = op == UPSERT, op == ARCHIVE
        gone[rows[op == DELETE]] = True
        merged = merged.copy(deep=False)
        for column in merged.columns:
            if column == "sourcedId":
                continue
            now = merged[column].iloc[rows].reset_index(drop=True)
            if column == "status":
                new = changes[column].where(upsert, now.where(~archive, "archived"))
            else:
                new = changes[column].where(upsert, now)
            changed = (new != now).to_numpy(dtype=bool)
            if changed.any():
                merged.iloc[rows[changed], merged.columns.get_loc(column)] = new[changed].to_numpy()
    added = delta[delta["op"].eq(UPSERT)]
    if len(rows):  # upserts of ids the base does not have are new rows
        added = added[~isin(added["sourcedId"], merged["sourcedId"].iloc[rows])]
    parts = [merged[~gone] if gone.any() else merged]
    if len(added):
        parts.append(added.drop(columns="op")[list(base.columns)])
    parts = [p for p in parts if len(p)]
    if not parts:
        return base.iloc[:0].reset_index(drop=True)
    out = parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)
    return out.reset_index(drop=True)


def _arrow_strings(values: pd.Series) -> pa.Array:
    arr = pa.array(values.array)
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


# ---------------------------------------------------------------------------------------------
# Writing (inside the apply's transaction)


@dataclass(frozen=True)
class SnapshotBase:
    """What the apply extends: the current snapshot head, or (when there is no usable snapshot)
    the state scanned from the tables before anything was written."""

    head: dict[str, Any] | None
    scanned: StoreState | None


def base_for_apply(conn: Connection, district_id: str, base_version: int) -> SnapshotBase:
    """Call after claiming the roster version and before writing any change."""
    _version, head = _versions(conn, district_id)
    if head is not None and head["roster_version"] == base_version:
        return SnapshotBase(head, None)
    return SnapshotBase(None, scan_state(conn, district_id))


def record_apply(
    conn: Connection,
    district_id: str,
    version: int,
    changes: dict[str, pd.DataFrame],
    base: SnapshotBase,
) -> None:
    """Record the applied changes as the snapshot at `version` (same transaction as the apply)."""
    deltas = {
        entity: delta_from_changes(entity, frame)
        for entity, frame in changes.items()
        if frame is not None and len(frame)
    }
    delta_rows = sum(len(d) for d in deltas.values())
    head = base.head
    if head is not None:
        pending = int(_delta_rows(conn, district_id)) + delta_rows
        if pending <= max(COMPACT_FRACTION * head["full_rows"], _COMPACT_MIN_ROWS):
            for entity, delta in deltas.items():
                _write_layer(conn, district_id, version, entity, "delta", delta)
            conn.execute(
                st.state_heads.update()
                .where(st.state_heads.c.district_id == district_id)
                .values(roster_version=version, delta_rows=pending)
            )
            return
        frames = _read_snapshot(conn, district_id, head)
        if frames is None:  # cannot happen inside the apply's transaction; stay correct anyway
            frames = scan_state(conn, district_id).frames
            deltas = {}
    else:
        assert base.scanned is not None
        frames = base.scanned.frames
    new = {
        entity: _normalised(entity, apply_delta(frames[entity], deltas.get(entity)))
        for entity in st.ROSTER_TABLES
    }
    write_full(conn, district_id, version, new)


def write_full(
    conn: Connection, district_id: str, version: int, frames: dict[str, pd.DataFrame]
) -> None:
    """Replace the district's snapshot by full images of `frames` at `version`."""
    conn.execute(st.state_layers.delete().where(st.state_layers.c.district_id == district_id))
    conn.execute(st.state_heads.delete().where(st.state_heads.c.district_id == district_id))
    for entity in st.ROSTER_TABLES:
        _write_layer(conn, district_id, version, entity, "full", frames[entity])
    conn.execute(
        st.state_heads.insert().values(
            district_id=district_id,
            roster_version=version,
            full_version=version,
            full_rows=sum(len(f) for f in frames.values()),
            delta_rows=0,
        )
    )


def _delta_rows(conn: Connection, district_id: str) -> int:
    return (
        conn.execute(
            sa.select(st.state_heads.c.delta_rows).where(
                st.state_heads.c.district_id == district_id
            )
        ).scalar()
        or 0
    )


def _write_layer(
    conn: Connection, district_id: str, version: int, entity: str, kind: str, frame: pd.DataFrame
) -> None:
    starts = range(0, max(len(frame), 1), _PART_ROWS)
    for part, start in enumerate(starts):
        conn.execute(
            st.state_layers.insert().values(
                district_id=district_id,
                roster_version=version,
                entity=entity,
                part=part,
                kind=kind,
                rows=min(_PART_ROWS, len(frame) - start),
                data=_encode(frame.iloc[start : start + _PART_ROWS]),
            )
        )


def _encode(frame: pd.DataFrame) -> bytes:
    """Arrow IPC with zstd: twice as fast as Parquet both ways for these few columns."""
    buffer = io.BytesIO()
    table = pa.Table.from_pandas(frame, preserve_index=False)
    options = ipc.IpcWriteOptions(compression="zstd")
    with ipc.new_file(buffer, table.schema, options=options) as writer:
        writer.write_table(table, max_chunksize=1 << 20)
    return buffer.getvalue()


def _decode(data: bytes) -> pd.DataFrame:
    frame = ipc.open_file(pa.BufferReader(data)).read_all().to_pandas()
    for column in frame.columns:
        if column != "row_hash" and frame[column].dtype != "str":
            frame[column] = frame[column].astype("str")
    return frame
