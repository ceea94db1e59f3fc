"""Capti's roster store (SQLAlchemy 2 Core): schema, reads, and the one-transaction apply.

Every row belongs to one district and is addressed by (district_id, sourced_id), so one district's
delivery can never touch another's rows. The districts row carries a `roster_version` that every
apply bumps inside its transaction: that row lock serialises concurrent applies of one district
(CLI run and daemon run alike) and detects a plan computed against an older roster.
"""

import io
import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from capti_pipeline.lib.fastops import isin

SCHEMA_VERSION = 1
metadata = sa.MetaData()


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


districts = sa.Table(
    "districts",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("source_url", sa.Text, nullable=False),
    sa.Column("sftp_key_path", sa.Text),
    sa.Column("known_hosts_path", sa.Text),
    sa.Column("password_env", sa.String(255)),
    sa.Column("higher_ed", sa.Boolean, nullable=False, default=False),
    sa.Column("active", sa.Boolean, nullable=False, default=True),
    sa.Column("paused", sa.Boolean, nullable=False, default=False),
    sa.Column("paused_until", sa.DateTime),
    sa.Column("pause_reason", sa.Text),
    sa.Column("adds_only", sa.Boolean, nullable=False, default=False),
    # Start a sync as soon as a new, complete upload settles (besides the nightly run).
    sa.Column("watch_uploads", sa.Boolean, nullable=False, default=False),
    sa.Column("thresholds", sa.Text, nullable=False, default="{}"),
    sa.Column("state", sa.String(32), nullable=False, default="registered"),
    sa.Column("state_detail", sa.Text),
    sa.Column("roster_version", sa.Integer, nullable=False, default=0),
    sa.Column("created_at", sa.DateTime, nullable=False, default=_now),
    sa.Column("updated_at", sa.DateTime, nullable=False, default=_now, onupdate=_now),
)


def _roster_table(name: str, *columns: sa.Column) -> sa.Table:
    return sa.Table(
        name,
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("district_id", sa.String(128), nullable=False),
        sa.Column("sourced_id", sa.String(255), nullable=False),
        *columns,
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("row_hash", sa.BigInteger, nullable=False),
        sa.Column("created_run", sa.String(64)),
        sa.Column("updated_run", sa.String(64)),
        sa.UniqueConstraint("district_id", "sourced_id", name=f"uq_{name}_district_sourced"),
    )


locations = _roster_table(
    "locations",
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("type", sa.String(16), nullable=False),
)
users = _roster_table(
    "users",
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("role", sa.String(32), nullable=False),
    sa.Column("username", sa.String(255), nullable=False),
    sa.Column("given_name", sa.Text, nullable=False),
    sa.Column("family_name", sa.Text, nullable=False),
    sa.Column("email", sa.Text, nullable=False),
    sa.Column("identifier", sa.Text, nullable=False),
    sa.Column("grades", sa.Text, nullable=False),
    sa.Column("locations", sa.Text, nullable=False),
)
sa.Index("ix_users_district_username", users.c.district_id, users.c.username)
classes = _roster_table(
    "classes",
    sa.Column("title", sa.Text, nullable=False),
    sa.Column("location", sa.String(255), nullable=False),
)
enrollments = _roster_table(
    "enrollments",
    sa.Column("class_sourced_id", sa.String(255), nullable=False),
    sa.Column("user_sourced_id", sa.String(255), nullable=False),
    sa.Column("role", sa.String(32), nullable=False),
)
memberships = sa.Table(
    "memberships",
    metadata,
    sa.Column("district_id", sa.String(128), primary_key=True),
    sa.Column("user_sourced_id", sa.String(255), primary_key=True),
    sa.Column("location_sourced_id", sa.String(255), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),
)
sync_runs = sa.Table(
    "sync_runs",
    metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("district_id", sa.String(128), nullable=False, index=True),
    sa.Column("kind", sa.String(16), nullable=False),  # sync | dry_run | approve | undo
    sa.Column("trigger", sa.String(255), nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("started_at", sa.DateTime, nullable=False, default=_now),
    sa.Column("finished_at", sa.DateTime),
    sa.Column("fingerprint", sa.String(64)),
    sa.Column("base_version", sa.Integer),
    sa.Column("counts", sa.Text),
    sa.Column("report", sa.Text),
    sa.Column("source_run_id", sa.String(64)),
)
# Held plans and change ledgers, one Parquet blob per entity: stored in the same database and
# written in the same transaction as the changes they describe.
run_payloads = sa.Table(
    "run_payloads",
    metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(16), primary_key=True),  # plan | ledger
    sa.Column("entity", sa.String(32), primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
)
# The roster state the diff needs, as Arrow snapshots written by every apply in its own
# transaction (lib/state.py): a full image per entity and delta layers since it, split in parts.
state_layers = sa.Table(
    "state_layers",
    metadata,
    sa.Column("district_id", sa.String(128), primary_key=True),
    sa.Column("roster_version", sa.Integer, primary_key=True),
    sa.Column("entity", sa.String(32), primary_key=True),
    sa.Column("part", sa.Integer, primary_key=True),
    sa.Column("kind", sa.String(8), nullable=False),  # full | delta
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
)
state_heads = sa.Table(
    "state_heads",
    metadata,
    sa.Column("district_id", sa.String(128), primary_key=True),
    sa.Column("roster_version", sa.Integer, nullable=False),  # the version the layers reach
    sa.Column("full_version", sa.Integer, nullable=False),
    sa.Column("full_rows", sa.Integer, nullable=False),
    sa.Column("delta_rows", sa.Integer, nullable=False),
)
import_requests = sa.Table(
    "import_requests",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("district_id", sa.String(128), nullable=False, index=True),
    sa.Column("requested_by", sa.String(255), nullable=False),
    sa.Column("requested_at", sa.DateTime, nullable=False, default=_now),
    sa.Column("state", sa.String(16), nullable=False),  # pending | taken | refused
    sa.Column("detail", sa.Text),
    sa.Column("taken_at", sa.DateTime),
    sa.Column("dagster_run_id", sa.String(64)),
)
duplicate_decisions = sa.Table(
    "duplicate_decisions",
    metadata,
    sa.Column("district_id", sa.String(128), primary_key=True),
    sa.Column("sourced_id", sa.String(255), primary_key=True),
    sa.Column("decision", sa.String(16), nullable=False),  # separate
    sa.Column("decided_at", sa.DateTime, nullable=False, default=_now),
)
schema_info = sa.Table(
    "schema_info",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
)

ROSTER_TABLES: dict[str, sa.Table] = {
    "locations": locations,
    "users": users,
    "classes": classes,
    "enrollments": enrollments,
}
# Roster frame column -> store column.
COLUMN_NAMES: dict[str, dict[str, str]] = {
    "locations": {"name": "name", "type": "type"},
    "users": {
        "enabled": "enabled",
        "role": "role",
        "username": "username",
        "givenName": "given_name",
        "familyName": "family_name",
        "email": "email",
        "identifier": "identifier",
        "grades": "grades",
        "locations": "locations",
    },
    "classes": {"title": "title", "location": "location"},
    "enrollments": {"class": "class_sourced_id", "user": "user_sourced_id", "role": "role"},
}


class StalePlanError(Exception):
    """The roster changed after the plan was computed; nothing was applied."""


class UnknownDistrictError(Exception):
    pass


_SQLITE_CACHE_KIB = 512 * 1024  # 512 MiB, an upper bound: pages are only allocated when used


def create_store_engine(url: str) -> Engine:
    """Engine with the settings the sync relies on; creates the SQLite folder when needed."""
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        database = sa.engine.make_url(url).database
        if database and database != ":memory:":
            # Names and emails: an owner-only folder and file (SQLite gives -wal/-shm its mode).
            path = Path(database)
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.touch(mode=0o600, exist_ok=True)
            for part in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                if part.exists() and part.stat().st_mode & 0o077:
                    part.chmod(0o600)
        kwargs["connect_args"] = {"timeout": 120}
    engine = sa.create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=120000")
            # A district's unique (district_id, sourced_id) index does not fit SQLite's default
            # 2 MB page cache: bulk inserts and scans of millions of rows thrash it.
            cursor.execute(f"PRAGMA cache_size=-{_SQLITE_CACHE_KIB}")
            cursor.execute("PRAGMA temp_store=MEMORY")
            cursor.close()

    return engine


def migrate(engine: Engine) -> None:
    """Create the schema (idempotent) and record its version."""
    metadata.create_all(engine)
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Parquet and Arrow blobs are compressed already: skip TOAST's compression attempt.
            for table in ("state_layers", "run_payloads"):
                conn.exec_driver_sql(f"ALTER TABLE {table} ALTER COLUMN data SET STORAGE EXTERNAL")
        current = conn.execute(sa.select(schema_info.c.version)).scalar()
        if current is None:
            conn.execute(schema_info.insert().values(id=1, version=SCHEMA_VERSION))


# ---------------------------------------------------------------------------------------------
# Districts


@dataclass(frozen=True)
class District:
    id: str
    name: str
    source_url: str
    sftp_key_path: str | None
    known_hosts_path: str | None
    password_env: str | None
    higher_ed: bool
    active: bool
    paused: bool
    paused_until: datetime | None
    pause_reason: str | None
    adds_only: bool
    watch_uploads: bool
    thresholds: dict[str, Any]
    state: str
    state_detail: str | None
    roster_version: int


def _district_from_row(row: Any) -> District:
    values = dict(row._mapping)
    values["thresholds"] = json.loads(values.get("thresholds") or "{}")
    for drop in ("created_at", "updated_at"):
        values.pop(drop, None)
    return District(**values)


def upsert_district(conn: Connection, district_id: str, **values: Any) -> None:
    if "thresholds" in values and not isinstance(values["thresholds"], str):
        values["thresholds"] = json.dumps(values["thresholds"], sort_keys=True)
    exists = conn.execute(sa.select(districts.c.id).where(districts.c.id == district_id)).first()
    if exists:
        conn.execute(districts.update().where(districts.c.id == district_id).values(**values))
    else:
        values.setdefault("name", district_id)
        conn.execute(districts.insert().values(id=district_id, **values))


def get_district(conn: Connection, district_id: str) -> District:
    row = conn.execute(sa.select(districts).where(districts.c.id == district_id)).first()
    if row is None:
        raise UnknownDistrictError(f"district {district_id!r} is not registered")
    return _district_from_row(row)


def list_districts(conn: Connection, *, include_removed: bool = False) -> list[District]:
    query = sa.select(districts).order_by(districts.c.id)
    if not include_removed:
        query = query.where(districts.c.active.is_(True))
    return [_district_from_row(row) for row in conn.execute(query)]


def set_district_state(conn: Connection, district_id: str, state: str, detail: str | None) -> None:
    conn.execute(
        districts.update()
        .where(districts.c.id == district_id)
        .values(state=state, state_detail=detail)
    )


# ---------------------------------------------------------------------------------------------
# Reading the roster


_FETCH_ROWS = 250_000


def read_columns(
    conn: Connection, entity: str, district_id: str, names: Sequence[str]
) -> pd.DataFrame:
    """Some columns of one district's rows of a roster table, fast: ``str`` (pyarrow) columns,
    int64 for row_hash and id. Every column read here is NOT NULL."""
    return read_table_columns(conn, ROSTER_TABLES[entity], district_id, names)


def read_table_columns(
    conn: Connection,
    table: sa.Table,
    district_id: str,
    names: Sequence[str],
    *,
    where: tuple[str, Sequence[str]] | None = None,
) -> pd.DataFrame:
    """:func:`read_columns` of any district table, optionally only rows whose column
    ``where[0]`` is one of ``where[1]`` (read in chunks of ids).

    Millions of rows go through neither SQLAlchemy rows nor per-value pandas boxing: PostgreSQL
    streams them as CSV (COPY) into pyarrow's parser; SQLite's cursor tuples become pyarrow arrays
    chunk by chunk.
    """
    unknown = [name for name in names if name not in table.c]
    if where is not None and where[0] not in table.c:
        unknown.append(where[0])
    if unknown:  # names are interpolated into SQL below: only the table's own columns
        raise ValueError(f"{table.name} has no column(s) {unknown}")
    types = {name: _arrow_type(table.c[name]) for name in names}
    # Booleans as 0/1 on every database (PostgreSQL's COPY would write t/f).
    columns = ", ".join(
        f"CAST({name} AS INTEGER)" if isinstance(table.c[name].type, sa.Boolean) else name
        for name in names
    )
    raw = conn.connection.driver_connection
    mark = _placeholder(conn)
    if where is not None:
        column, values = where
        wanted = list(dict.fromkeys(values))
        parts = []
        for chunk in _chunks(wanted, 900):
            marks = ", ".join(mark for _ in chunk)
            sql = (
                f"SELECT {columns} FROM {table.name} WHERE district_id = {mark} "
                f"AND {column} IN ({marks})"
            )
            parts.append(_fetch_columns(raw, sql, (district_id, *chunk), types))
        arrays = {
            name: pa.chunked_array([c for part in parts for c in part[name].chunks], type=type_)
            for name, type_ in types.items()
        }
    elif conn.dialect.name == "postgresql":
        arrays = _copy_columns(raw, table.name, columns, district_id, types)
    else:
        # Not the (district_id, sourced_id) index: one lookup per row in sourcedId order costs
        # several times a scan of the table in storage order (a store holds few districts).
        hint = " NOT INDEXED" if conn.dialect.name == "sqlite" else ""
        sql = f"SELECT {columns} FROM {table.name}{hint} WHERE district_id = {mark}"
        arrays = _fetch_columns(raw, sql, (district_id,), types)
    frame = pa.table(arrays).to_pandas()
    for name in names:
        column = table.c[name]
        if isinstance(column.type, sa.Boolean):
            frame[name] = frame[name].astype(bool)
        elif isinstance(column.type, sa.Integer) and column.nullable:
            frame[name] = frame[name].astype("Int64")
        elif not isinstance(column.type, sa.Integer):
            frame[name] = frame[name].astype("str")
    return frame


def _arrow_type(column: sa.Column) -> pa.DataType:
    """How a column's values travel from the driver (SQLite gives booleans as 0/1)."""
    if isinstance(column.type, sa.Boolean):
        return pa.int8()
    if isinstance(column.type, sa.Integer):
        return pa.int64()
    return pa.large_string()


def _fetch_columns(
    raw: Any, sql: str, params: tuple[Any, ...], types: dict[str, pa.DataType]
) -> dict[str, pa.ChunkedArray]:
    chunks: dict[str, list[pa.Array]] = {name: [] for name in types}
    # pyarrow converts the row tuples as structs in one pass (no per-column transposition).
    row_type = pa.struct([(name, type_) for name, type_ in types.items()])
    cursor = raw.cursor()
    try:
        cursor.execute(sql, params)
        while rows := cursor.fetchmany(_FETCH_ROWS):
            for name, values in zip(types, pa.array(rows, type=row_type).flatten(), strict=True):
                chunks[name].append(values)
    finally:
        cursor.close()
    return {name: pa.chunked_array(chunks[name], type=type_) for name, type_ in types.items()}


def _copy_columns(
    raw: Any, table: str, columns: str, district_id: str, types: dict[str, pa.DataType]
) -> dict[str, pa.ChunkedArray]:
    from psycopg import sql as pg_sql

    statement = pg_sql.SQL(
        "COPY (SELECT {columns} FROM {table} WHERE district_id = {district}) "
        "TO STDOUT WITH (FORMAT csv)"
    ).format(
        columns=pg_sql.SQL(columns),
        table=pg_sql.Identifier(table),
        district=pg_sql.Literal(district_id),
    )
    buffer = io.BytesIO()
    with raw.cursor() as cursor, cursor.copy(statement) as copy:
        for block in copy:
            buffer.write(block)
    if buffer.tell() == 0:
        return {name: pa.chunked_array([], type=type_) for name, type_ in types.items()}
    buffer.seek(0)
    table_ = pa_csv.read_csv(
        buffer,
        read_options=pa_csv.ReadOptions(column_names=list(types)),
        parse_options=pa_csv.ParseOptions(newlines_in_values=True),
        # COPY writes NULL unquoted and an empty string as "": only the former is null.
        convert_options=pa_csv.ConvertOptions(
            column_types=types, strings_can_be_null=True, quoted_strings_can_be_null=False
        ),
    )
    return {name: table_[name] for name in types}


def known_org_types(conn: Connection, district_id: str) -> dict[str, str]:
    rows = conn.execute(
        sa.select(locations.c.sourced_id, locations.c.type).where(
            locations.c.district_id == district_id, locations.c.status == "active"
        )
    )
    return {sourced_id: kind for sourced_id, kind in rows}


def read_full_rows(
    conn: Connection, district_id: str, entity: str, sourced_ids: Sequence[str] | None = None
) -> pd.DataFrame:
    """Full store rows of an entity (all, or only the given sourcedIds), store column names."""
    table = ROSTER_TABLES[entity]
    names = [c.name for c in table.c if c.name != "district_id"]
    if sourced_ids is None:
        return read_table_columns(conn, table, district_id, names)
    wanted = list(dict.fromkeys(sourced_ids))
    if len(wanted) > 200_000:
        # Very many ids (an undo of a big import): one scan beats that many index lookups.
        everything = read_table_columns(conn, table, district_id, names)
        return everything[isin(everything["sourced_id"], wanted)].reset_index(drop=True)
    return read_table_columns(conn, table, district_id, names, where=("sourced_id", wanted))


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ---------------------------------------------------------------------------------------------
# Writing


def _placeholder(conn: Connection) -> str:
    return "?" if conn.dialect.paramstyle == "qmark" else "%s"


def _rows(frame: pd.DataFrame, columns: Sequence[str]) -> list[tuple[Any, ...]]:
    return list(zip(*(frame[c].tolist() for c in columns), strict=True)) if len(frame) else []


def execute_many(conn: Connection, sql: str, rows: Iterable[tuple[Any, ...]]) -> int:
    """executemany through the driver, in batches, with the driver's placeholder style."""
    batch: list[tuple[Any, ...]] = []
    total = 0
    statement = sql.replace("?", _placeholder(conn))
    for row in rows:
        batch.append(row)
        if len(batch) >= 50_000:
            conn.exec_driver_sql(statement, batch)
            total += len(batch)
            batch = []
    if batch:
        conn.exec_driver_sql(statement, batch)
        total += len(batch)
    return total


_INSERT_BATCH = 50_000
# SQLite's ->> operator (3.38+) reads JSON array items as SQL values.
_SQLITE_HAS_JSON_ARROWS = sqlite3.sqlite_version_info >= (3, 38, 0)


def insert_frame(
    conn: Connection,
    table: str,
    frame: pd.DataFrame,
    constants: dict[str, Any] | None = None,
    order: np.ndarray | None = None,
) -> int:
    """Bulk insert of a frame whose columns are target columns, plus `constants` (the same value
    in every row), in batches (one batch encoded at a time), with no per-row Python: on
    PostgreSQL COPY of the frame written as CSV by pyarrow; on SQLite one INSERT ... SELECT over
    a JSON array per batch (pandas writes the JSON in C, SQLite reads it in C: half the cost of
    executemany's per-value binding). Rows go in `order` (positions) when given."""
    if frame.empty:
        return 0
    constants = constants or {}
    if order is not None:
        # One take of the whole frame: taking batch by batch from columns of many Arrow chunks
        # costs 2-3x more (17 s for a first import of a million students).
        frame = frame.take(order)
    json_path = conn.dialect.name == "sqlite" and _SQLITE_HAS_JSON_ARROWS

    def rows_of(start: int, stop: int) -> pd.DataFrame:
        rows = frame.iloc[start:stop]
        return rows.assign(**constants) if constants and not json_path else rows

    if json_path:  # constants are statement parameters
        names = [*constants, *frame.columns]
        values = [f"?{i + 2}" for i in range(len(constants))]
        values += [f"value ->> {i}" for i in range(len(frame.columns))]
        statement = (
            f"INSERT INTO {table} ({', '.join(names)}) SELECT {', '.join(values)} "
            "FROM json_each(?1)"
        )
        # SQLite runs a batch's INSERT without the GIL: the next batch's JSON is written
        # meanwhile (the connection is only ever used by one thread at a time).
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-insert") as writer:
            pending: Future[Any] | None = None
            for start in range(0, len(frame), _INSERT_BATCH):
                payload = rows_of(start, start + _INSERT_BATCH).to_json(orient="values")
                if pending is not None:
                    pending.result()
                parameters = (payload, *constants.values())
                pending = writer.submit(conn.exec_driver_sql, statement, parameters)
            if pending is not None:
                pending.result()
        return len(frame)
    columns = [*frame.columns, *constants]
    if conn.dialect.name != "postgresql":
        marks = ", ".join("?" for _ in columns)
        statement = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})"
        statement = statement.replace("?", _placeholder(conn))
        for start in range(0, len(frame), _INSERT_BATCH):
            conn.exec_driver_sql(statement, _rows(rows_of(start, start + _INSERT_BATCH), columns))
        return len(frame)
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    statement = f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT csv)"
    with cursor.copy(statement) as copy:
        for start in range(0, len(frame), 10 * _INSERT_BATCH):
            buffer = io.BytesIO()
            pa_csv.write_csv(
                pa.Table.from_pandas(
                    rows_of(start, start + 10 * _INSERT_BATCH), preserve_index=False
                ),
                buffer,
                # Strings are always quoted, so '' stays '' (unquoted empty is NULL to COPY).
                pa_csv.WriteOptions(include_header=False, quoting_style="needed"),
            )
            copy.write(buffer.getbuffer())
    return len(frame)


def claim_roster_version(conn: Connection, district_id: str, base_version: int) -> int:
    """Lock the district row and bump its version, or fail if another apply got there first."""
    result = conn.execute(
        districts.update()
        .where(districts.c.id == district_id, districts.c.roster_version == base_version)
        .values(roster_version=base_version + 1)
    )
    if result.rowcount != 1:
        current = conn.execute(
            sa.select(districts.c.roster_version).where(districts.c.id == district_id)
        ).scalar()
        raise StalePlanError(
            f"district {district_id}: the roster changed (version {current}) after this plan was "
            f"computed against version {base_version}; nothing applied, run the sync again"
        )
    return base_version + 1


def frame_to_parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def parquet_to_frame(data: bytes) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(data))


def save_payload(conn: Connection, run_id: str, kind: str, frames: dict[str, pd.DataFrame]) -> None:
    conn.execute(
        run_payloads.delete().where(run_payloads.c.run_id == run_id, run_payloads.c.kind == kind)
    )
    for entity, frame in frames.items():
        conn.execute(
            run_payloads.insert().values(
                run_id=run_id, kind=kind, entity=entity, data=frame_to_parquet(frame)
            )
        )


def load_payload(conn: Connection, run_id: str, kind: str) -> dict[str, pd.DataFrame]:
    rows = conn.execute(
        sa.select(run_payloads.c.entity, run_payloads.c.data).where(
            run_payloads.c.run_id == run_id, run_payloads.c.kind == kind
        )
    )
    return {entity: parquet_to_frame(data) for entity, data in rows}


def drop_payload(conn: Connection, run_id: str, kind: str) -> None:
    conn.execute(
        run_payloads.delete().where(run_payloads.c.run_id == run_id, run_payloads.c.kind == kind)
    )


# ---------------------------------------------------------------------------------------------
# Sync runs


def record_run_start(
    conn: Connection,
    run_id: str,
    district_id: str,
    *,
    kind: str,
    trigger: str,
    source_run_id: str | None = None,
) -> None:
    conn.execute(sync_runs.delete().where(sync_runs.c.run_id == run_id))
    conn.execute(
        sync_runs.insert().values(
            run_id=run_id,
            district_id=district_id,
            kind=kind,
            trigger=trigger,
            state="running",
            started_at=_now(),
            source_run_id=source_run_id,
        )
    )
    set_district_state(conn, district_id, "running", f"run {run_id}")


def record_run_end(
    conn: Connection,
    run_id: str,
    *,
    state: str,
    reason: str | None = None,
    counts: dict[str, Any] | None = None,
    report: dict[str, Any] | None = None,
    fingerprint: str | None = None,
    base_version: int | None = None,
) -> None:
    values: dict[str, Any] = {"state": state, "reason": reason, "finished_at": _now()}
    if counts is not None:
        values["counts"] = json.dumps(counts, sort_keys=True)
    if report is not None:
        values["report"] = json.dumps(report, sort_keys=True, default=str)
    if fingerprint is not None:
        values["fingerprint"] = fingerprint
    if base_version is not None:
        values["base_version"] = base_version
    conn.execute(sync_runs.update().where(sync_runs.c.run_id == run_id).values(**values))
    district_id = conn.execute(
        sa.select(sync_runs.c.district_id).where(sync_runs.c.run_id == run_id)
    ).scalar()
    if district_id is not None:
        set_district_state(conn, district_id, state, reason)


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    district_id: str
    kind: str
    trigger: str
    state: str
    reason: str | None
    started_at: datetime
    finished_at: datetime | None
    fingerprint: str | None
    base_version: int | None
    counts: dict[str, Any]
    report: dict[str, Any]
    source_run_id: str | None


def _run_from_row(row: Any) -> RunRecord:
    values = dict(row._mapping)
    values["counts"] = json.loads(values["counts"] or "{}")
    values["report"] = json.loads(values["report"] or "{}")
    return RunRecord(**values)


def get_run(conn: Connection, run_id: str) -> RunRecord | None:
    row = conn.execute(sa.select(sync_runs).where(sync_runs.c.run_id == run_id)).first()
    return _run_from_row(row) if row else None


def list_runs(
    conn: Connection, district_id: str, *, states: Sequence[str] | None = None, limit: int = 50
) -> list[RunRecord]:
    query = sa.select(sync_runs).where(sync_runs.c.district_id == district_id)
    if states:
        query = query.where(sync_runs.c.state.in_(list(states)))
    query = query.order_by(sync_runs.c.started_at.desc(), sync_runs.c.run_id.desc()).limit(limit)
    return [_run_from_row(row) for row in conn.execute(query)]


def latest_run(
    conn: Connection, district_id: str, *, states: Sequence[str] | None = None
) -> RunRecord | None:
    runs = list_runs(conn, district_id, states=states, limit=1)
    return runs[0] if runs else None
